"""Calibration and uncertainty metrics as torchmetrics ``Metric`` objects (distributed-safe).

Classification metrics take ensemble probabilities ``(B, C)`` and targets ``(B,)``; diversity metrics
take member probabilities ``(M, B, C)``; OOD metrics take ``(scores, is_ood)``; regression metrics
take a Gaussian ``(mean, var, target)``. :class:`ClassificationMetrics` / :class:`RegressionMetrics`
bundle them for ensemble modules.

Behaviour shared by every metric here:

- **No data.** ``compute()`` on a metric that no sample reached (``update()`` never called, or only
  with empty batches, on every process) returns NaN (every value NaN for the metric sets) and
  issues one rank-zero :class:`NoSamplesWarning` naming the metric: "no samples were passed to
  update()". torchmetrics' own compute-before-update warning is not repeated.
- **Ties.** Values never depend on the order of the samples: tied confidences are one operating
  point for ``AURC`` / ``CoverageAtRisk`` (as for the OOD ranking metrics) and one unit in
  ``AdaptiveCalibrationError``'s equal-mass bins.
- **Input checks.** Probabilities must lie in [0, 1] and rows sum to 1, checked in float64 within a
  tolerance that follows the input dtype (bfloat16 softmax outputs pass, float32 rows off by 1e-2 do
  not); logits-taking sets refuse inputs that look like probabilities.
"""

from ._empty import NoSamplesWarning
from .calibration import AdaptiveCalibrationError, ClasswiseCalibrationError, ExpectedCalibrationError

# Beyond classification logits (issue 19): OOD scores, dense (segmentation) and multilabel outputs.
from .dense import DenseMeanIoU, DenseMetrics, aggregate_dense_probs
from .diversity import (
    Disagreement,
    MutualInformation,
    PredictiveEntropy,
    entropy,
    mutual_information,
    pairwise_disagreement,
)
from .multilabel import MultilabelCalibrationError, MultilabelMetrics, aggregate_sigmoid
from .ood import FPR95, OODAUPR, OODAUROC
from .ood_scores import OOD_SCORES, OODScoreMetrics, energy_score, max_logit_score, ood_score, variation_ratio
from .presets import ClassificationMetrics, MemberAccuracy, RegressionMetrics, TopLabelAccuracy
from .regression import GaussianNLL, IntervalCoverage, QuantileCalibrationError
from .scoring import BrierScore, NegativeLogLikelihood
from .selective import AURC, CoverageAtRisk
from .sets import SetCoverage, SetSize

__all__ = [
    "AURC",
    "FPR95",
    "OODAUPR",
    "OODAUROC",
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
    "NoSamplesWarning",
    "PredictiveEntropy",
    "QuantileCalibrationError",
    "RegressionMetrics",
    "SetCoverage",
    "SetSize",
    "TopLabelAccuracy",
    "entropy",
    "mutual_information",
    "pairwise_disagreement",
    "DenseMetrics",
    "DenseMeanIoU",
    "MultilabelCalibrationError",
    "MultilabelMetrics",
    "OOD_SCORES",
    "OODScoreMetrics",
    "aggregate_dense_probs",
    "aggregate_sigmoid",
    "energy_score",
    "max_logit_score",
    "ood_score",
    "variation_ratio",
]
