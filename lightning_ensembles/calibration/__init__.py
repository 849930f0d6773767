"""Post-hoc calibration: temperature scaling and split-conformal prediction sets."""

from .conformal import ConformalClassifier, conformal_quantile, conformal_scores
from .temperature import TemperatureScaler, fit_temperature, scaled_log_probs

__all__ = [
    "ConformalClassifier",
    "TemperatureScaler",
    "conformal_quantile",
    "conformal_scores",
    "fit_temperature",
    "scaled_log_probs",
]
