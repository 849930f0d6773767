"""Post-hoc calibration: temperature scaling and split-conformal prediction sets."""

from .conformal import ConformalClassifier, conformal_quantile, conformal_scores
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
