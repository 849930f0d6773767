"""Ensemble methods: each module holds one method's converter and its :class:`Ensemble` class.

The layers the converters build live in :mod:`.layers`; the contract every ensemble follows in :mod:`.base`;
:func:`build_ensemble` builds a method by name.
"""

from .asymmetric import WAsymmetricLayer, asymmetric_ensemble, w_asymmetric
from .base import Ensemble, GaussianMixture, OwnObjective, training_outputs
from .batch import BatchEnsemble, TabM, tabm
from .deep import DeepEnsemble
from .evidential import DirichletHead, NIGHead, evidential_head
from .lora import LoRAEnsemble
from .masksembles import Masksembles
from .mc_dropout import MCDropout
from .mimo import MIMO
from .packed import PackedEnsemble
from .registry import ENSEMBLE_METHODS, build_ensemble, register_method
from .surgery import ConversionError
from .symmetry import MultiSymmetryEnsemble
from .tta import TTAEnsemble

__all__ = [
    "Ensemble",
    "GaussianMixture",
    "OwnObjective",
    "training_outputs",
    "ConversionError",
    "ENSEMBLE_METHODS",
    "build_ensemble",
    "register_method",
    "DeepEnsemble",
    "PackedEnsemble",
    "BatchEnsemble",
    "TabM",
    "tabm",
    "LoRAEnsemble",
    "MCDropout",
    "MIMO",
    "Masksembles",
    "MultiSymmetryEnsemble",
    "TTAEnsemble",
    "asymmetric_ensemble",
    "w_asymmetric",
    "WAsymmetricLayer",
    "DirichletHead",
    "NIGHead",
    "evidential_head",
]
