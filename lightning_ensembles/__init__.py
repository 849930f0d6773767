"""lightning-ensembles: uncertainty-aware ensembles for PyTorch Lightning.

The public menu::

    from lightning_ensembles import (
        DeepEnsemble, PackedEnsemble, BatchEnsemble, TabM, LoRAEnsemble, MultiSymmetryEnsemble,  # ensembles
        EnsembleClassifier, EnsembleRegressor,                                                   # LightningModules
        Ensembling, MemberWeightAveraging, SnapshotEnsemble, CalibrationMetrics,                 # callbacks
        TemperatureScaling, ReliabilityDiagram, ConformalPrediction,
        MemberParallelStrategy,                                                                  # distributed
    )

Losses live in :mod:`lightning_ensembles.losses`, metrics in :mod:`lightning_ensembles.metrics`,
averaging tools in :mod:`lightning_ensembles.averaging`, data in :mod:`lightning_ensembles.data`.
"""

from .backbones import CNN1D, MLP, register_backbone, resolve_backbone

# Cost-aware inference (issue 20): cascades, distillation, bridges.
from .callbacks import (
    CalibrationMetrics,
    CascadeEvaluation,
    ConformalPrediction,
    Ensembling,
    LastLayerLaplace,
    MemberWeightAveraging,
    PosthocCalibration,
    ReliabilityDiagram,
    SnapshotEnsemble,
    TemperatureScaling,
)

# More ensemble families (issue 18).
from .ensembles.asymmetric import asymmetric_ensemble, w_asymmetric
from .ensembles.base import Ensemble, GaussianMixture, aggregate_gaussian, aggregate_log_probs, aggregate_probs
from .ensembles.batch import BatchEnsemble, TabM
from .ensembles.deep import DeepEnsemble

# Beyond classification logits (issue 19).
from .ensembles.evidential import DirichletHead, NIGHead, evidential_head
from .ensembles.lora import LoRAEnsemble
from .ensembles.masksembles import Masksembles
from .ensembles.mc_dropout import MCDropout
from .ensembles.mimo import MIMO
from .ensembles.packed import PackedEnsemble
from .ensembles.registry import build_ensemble, register_method
from .ensembles.symmetry import MultiSymmetryEnsemble
from .ensembles.tta import TTAEnsemble
from .inference import BridgeEnsemble, DistillationModule, EnsembleCascade, MultiHeadStudent, count_macs
from .losses.base import Regularizer
from .modules import EnsembleClassifier, EnsembleRegressor

# Importing the strategies registers `Trainer(strategy="member_parallel")`.
from .strategies import MemberParallelStrategy, MemberShard, fully_shard_ensembles

__version__ = "0.1.0"

__all__ = [
    "CNN1D",
    "MLP",
    "MemberParallelStrategy",
    "MemberShard",
    "BatchEnsemble",
    "CalibrationMetrics",
    "ConformalPrediction",
    "DeepEnsemble",
    "Ensemble",
    "EnsembleClassifier",
    "EnsembleRegressor",
    "Ensembling",
    "GaussianMixture",
    "LoRAEnsemble",
    "MemberWeightAveraging",
    "MultiSymmetryEnsemble",
    "PackedEnsemble",
    "Regularizer",
    "ReliabilityDiagram",
    "SnapshotEnsemble",
    "TabM",
    "TemperatureScaling",
    "aggregate_gaussian",
    "aggregate_log_probs",
    "aggregate_probs",
    "build_ensemble",
    "fully_shard_ensembles",
    "register_backbone",
    "register_method",
    "resolve_backbone",
    "MCDropout",
    "MIMO",
    "Masksembles",
    "TTAEnsemble",
    "asymmetric_ensemble",
    "w_asymmetric",
    "DirichletHead",
    "NIGHead",
    "LastLayerLaplace",
    "PosthocCalibration",
    "evidential_head",
    "BridgeEnsemble",
    "CascadeEvaluation",
    "DistillationModule",
    "EnsembleCascade",
    "MultiHeadStudent",
    "count_macs",
]
