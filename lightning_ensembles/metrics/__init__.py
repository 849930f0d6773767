"""Calibration and uncertainty metrics as torchmetrics ``Metric`` objects (distributed-safe).

Classification metrics take ensemble probabilities ``(B, C)`` and targets ``(B,)``; diversity metrics
take member probabilities ``(M, B, C)``; OOD metrics take ``(scores, is_ood)``; regression metrics
take a Gaussian ``(mean, var, target)``. :class:`ClassificationMetrics` / :class:`RegressionMetrics`
bundle them for ensemble modules.
"""

from .calibration import AdaptiveCalibrationError, ClasswiseCalibrationError, ExpectedCalibrationError
from .presets import Accuracy, ClassificationMetrics, MemberAccuracy, RegressionMetrics
from .diversity import Disagreement, MutualInformation, PredictiveEntropy, entropy, mutual_information, pairwise_disagreement
from .ood import FPR95, OODAUPR, OODAUROC
from .regression import GaussianNLL, IntervalCoverage, QuantileCalibrationError
from .scoring import BrierScore, NegativeLogLikelihood
from .selective import AURC, CoverageAtRisk
from .sets import SetCoverage, SetSize

__all__ = [
    "AURC",
    "FPR95",
    "OODAUPR",
    "OODAUROC",
    "Accuracy",
    "AdaptiveCalibrationError",
    "BrierScore",
    "ClassificationMetrics",
    "ClasswiseCalibrationError",
    "CoverageAtRisk",
    "Disagreement",
    "ExpectedCalibrationError",
    "GaussianNLL",
    "IntervalCoverage",
    "MemberAccuracy",
    "MutualInformation",
    "NegativeLogLikelihood",
    "PredictiveEntropy",
    "QuantileCalibrationError",
    "RegressionMetrics",
    "SetCoverage",
    "SetSize",
    "entropy",
    "mutual_information",
    "pairwise_disagreement",
]
