"""Post-hoc calibration: temperature, vector, matrix and Dirichlet scaling, histogram binning, isotonic
regression, split-conformal prediction sets, and last-layer Laplace."""

from ._base import calibrated_logits
from .binning import HistogramBinning, IsotonicCalibration
from .conformal import ConformalClassifier, conformal_quantile, conformal_scores
from .laplace import LaplaceEnsemble, fit_laplace, load_laplace_ensemble
from .scaling import DirichletCalibration, MatrixScaling, VectorScaling
from .temperature import (
    MIN_SAMPLES,
    TEMPERATURE_BOUNDS,
    CalibrationWarning,
    TemperatureFit,
    TemperatureScaler,
    fit_temperature,
    member_log_probs,
    safe_fit_temperature,
    scaled_log_probs,
    temperature_nll,
)

__all__ = [
    "calibrated_logits",
    "DirichletCalibration",
    "HistogramBinning",
    "IsotonicCalibration",
    "LaplaceEnsemble",
    "fit_laplace",
    "load_laplace_ensemble",
    "MatrixScaling",
    "VectorScaling",
    "MIN_SAMPLES",
    "TEMPERATURE_BOUNDS",
    "CalibrationWarning",
    "ConformalClassifier",
    "TemperatureFit",
    "TemperatureScaler",
    "conformal_quantile",
    "conformal_scores",
    "fit_temperature",
    "member_log_probs",
    "safe_fit_temperature",
    "scaled_log_probs",
    "temperature_nll",
]
