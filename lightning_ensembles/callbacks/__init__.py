"""Trainer callbacks that plug ensembles, averaging and calibration into any LightningModule."""

# Calibration callbacks (metrics, temperature scaling, reliability diagrams, conformal sets).
from .calibration_metrics import CalibrationMetrics
from .conformal import ConformalPrediction
from .reliability_diagram import ReliabilityDiagram
from .temperature_scaling import TemperatureScaling

# Plug-in ensembling of an unchanged LightningModule.
from .ensembling import EnsembledModel, Ensembling
