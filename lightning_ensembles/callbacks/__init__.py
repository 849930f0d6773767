"""Trainer callbacks that plug ensembles, averaging and calibration into any LightningModule."""

from .calibration_metrics import CalibrationMetrics
from .cascade import CascadeEvaluation
from .conformal import ConformalPrediction
from .ensembling import EnsembledModel, Ensembling
from .laplace import LastLayerLaplace
from .posthoc_calibration import PosthocCalibration
from .prediction_writer import PredictionWriter
from .reliability_diagram import ReliabilityDiagram
from .snapshot import SnapshotEnsemble
from .temperature_scaling import TemperatureScaling
from .weight_averaging import MemberWeightAveraging

__all__ = [
    "CalibrationMetrics",
    "CascadeEvaluation",
    "ConformalPrediction",
    "EnsembledModel",
    "Ensembling",
    "LastLayerLaplace",
    "MemberWeightAveraging",
    "PosthocCalibration",
    "PredictionWriter",
    "ReliabilityDiagram",
    "SnapshotEnsemble",
    "TemperatureScaling",
]
