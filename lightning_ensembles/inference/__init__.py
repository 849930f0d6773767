"""Cost-aware prediction: early-exit cascades, distillation into one student, bridge networks.

Each answers the criticism that a deep ensemble costs M forward passes; MACs are always counted
from real forward passes (:mod:`~lightning_ensembles.inference.macs`), never estimated.
"""

from .bridge import BezierCurve, BridgeEnsemble, default_bridge, fit_bezier_curve, fit_bridge
from .cascade import CascadeOutput, EnsembleCascade, evaluate_cascade, prediction_metrics, uncertainty
from .distill import DistillationModule, MultiHeadStudent, distillation_loss, mixup_inputs
from .macs import MacCounter, count_macs, macs_per_sample

__all__ = [
    "BezierCurve",
    "BridgeEnsemble",
    "DistillationModule",
    "MultiHeadStudent",
    "default_bridge",
    "distillation_loss",
    "fit_bezier_curve",
    "fit_bridge",
    "CascadeOutput",
    "EnsembleCascade",
    "MacCounter",
    "count_macs",
    "evaluate_cascade",
    "macs_per_sample",
    "mixup_inputs",
    "prediction_metrics",
    "uncertainty",
]
