"""lightning-ensembles: uncertainty-aware ensembles for PyTorch Lightning.

The public menu::

    from lightning_ensembles import DeepEnsemble, EnsembleClassifier, EnsembleRegressor
"""

from .backbones import MLP, resolve_backbone
from .ensembles.base import Ensemble, GaussianMixture, aggregate_gaussian, aggregate_log_probs, aggregate_probs
from .ensembles.deep import DeepEnsemble
from .ensembles.registry import build_ensemble, register_method
from .losses.base import Regularizer
from .modules import EnsembleClassifier, EnsembleRegressor

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "DeepEnsemble",
    "Ensemble",
    "EnsembleClassifier",
    "EnsembleRegressor",
    "GaussianMixture",
    "Regularizer",
    "aggregate_gaussian",
    "aggregate_log_probs",
    "aggregate_probs",
    "build_ensemble",
    "register_method",
    "resolve_backbone",
]
