"""Ready-made metric sets for ensemble modules: one ``update`` with member outputs, one flat ``compute`` dict."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from .._checks import (
    check_choice,
    check_finite,
    check_not_probs,
    check_num_classes,
    check_positive_int,
    check_probs,
    check_targets,
)
from ..ensembles.base import aggregate_gaussian
from ._empty import NaNWhenEmpty, cat_state, no_samples, quiet_when_empty
from ._running import PerSampleMean, add_sums, ratio_or_nan
from .calibration import ExpectedCalibrationError
from .diversity import Disagreement, MutualInformation
from .regression import GaussianNLL, IntervalCoverage
from .scoring import BrierScore, NegativeLogLikelihood


class TopLabelAccuracy(PerSampleMean):
    """Top-1 accuracy of ``(B, C)`` probabilities (or logits) against ``(B,)`` class indices.

    Args:
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = TopLabelAccuracy()
        >>> m.update(torch.tensor([[.9, .1], [.4, .6]]), torch.tensor([0, 0]))
        >>> float(m.compute())
        0.5
    """

    higher_is_better = True

    def update(self, probs: Tensor, target: Tensor) -> None:
        check_targets(target, probs.shape[0], probs.shape[-1])
        self._add(probs.argmax(-1) == target)


class MemberAccuracy(NaNWhenEmpty, Metric):
    """Accuracy of each member from member probabilities or logits ``(M, B, C)``: a ``(M,)`` tensor.

    The number of members is read from the input, so one instance serves any ensemble (per-batch
    counts are kept as a list state: a few numbers per batch, synced by concatenation). Without
    samples the number of members is unknown: ``compute()`` returns a scalar NaN.

    Args:
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> m = MemberAccuracy()
        >>> m.update(torch.tensor([[[.9, .1]], [[.2, .8]]]), torch.tensor([0]))
        >>> m.compute().tolist()
        [1.0, 0.0]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: list[Tensor]
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", [], dist_reduce_fx="cat")
        add_sums(self, "count")

    def update(self, member_outputs: Tensor, target: Tensor) -> None:
        if member_outputs.dim() != 3:
            raise ValueError(f"member outputs must be (M, B, C); got shape {tuple(member_outputs.shape)}.")
        check_targets(target, member_outputs.shape[1], member_outputs.shape[-1])
        self.correct.append((member_outputs.argmax(-1) == target).sum(1, dtype=torch.float64)[None])
        self.count += target.numel()

    def compute(self) -> Tensor:
        return ratio_or_nan(self, cat_state(self.correct).sum(0), self.count)


class _MetricSet(MetricCollection):
    """A collection whose ``compute()`` without samples returns every value NaN, after one warning naming it."""

    #: The key (without prefix / postfix) of a value that is NaN only when no sample arrived.
    _witness: str

    def compute(self) -> dict[str, Tensor]:
        with quiet_when_empty(ours=True):  # one warning for the whole set, below
            values = super().compute()
        key = f"{self.prefix or ''}{self._witness}{self.postfix or ''}"
        if key in values and bool(torch.isnan(values[key]).all()):
            no_samples(self)
            return {key: torch.full_like(value, float("nan")) for key, value in values.items()}
        return self._with_samples(values)

    def _with_samples(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The computed values of a set that saw samples, as returned."""
        return values


class ClassificationMetrics(_MetricSet):
    r"""Validation/test metrics of a classification ensemble from **member logits**.

    Input contract: ``update(member_logits, target)`` with ``member_logits`` ``(M, B, C)`` raw
    logits, member axis first (a single model: ``logits.unsqueeze(0)``), and ``target`` ``(B,)``
    integer class indices. The ensemble prediction is the mean of member softmax probabilities.
    Probabilities passed as logits would be softmaxed a second time (NLL 1.51 instead of 0.056):
    a batch whose values all lie in [0, 1] with every row summing to 1 is refused with a
    ``ValueError``. For member probabilities build the set with ``inputs="probs"``.

    ``compute()`` returns a flat dict (keys get the collection's ``prefix``/``postfix``):
    ``acc``, ``nll``, ``brier``, ``ece`` (top-label, ``n_bins`` equal-width bins), ``member_acc/<i>``
    for each member, ``disagreement`` (mean pairwise argmax disagreement) and
    ``mutual_information`` (nats). Every state is a sum (constant memory), synced across processes.
    Without samples every value is NaN (``member_acc`` then has one key: the member count is
    unknown) and one :class:`~lightning_ensembles.metrics.NoSamplesWarning` names the set.

    Args:
        num_classes: the number of classes C (checked against the inputs' last axis).
        n_bins: the number of equal-width bins of the ECE.
        prefix: added before every key, e.g. ``"val/"``.
        postfix: added after every key.
        inputs: ``"logits"`` (default) or ``"probs"``: what ``update`` receives as ``(M, B, C)``.

    Example:
        >>> import torch
        >>> metrics = ClassificationMetrics(num_classes=3, prefix="val/")
        >>> metrics.update(torch.randn(4, 8, 3), torch.randint(0, 3, (8,)))
        >>> sorted(metrics.compute())[:3]
        ['val/acc', 'val/brier', 'val/disagreement']
    """

    _witness = "acc"

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        prefix: str | None = None,
        postfix: str | None = None,
        inputs: Literal["logits", "probs"] = "logits",
    ) -> None:
        check_positive_int(num_classes, "num_classes")
        check_choice("inputs", inputs, ("logits", "probs"), hint="It is what update() receives.")
        super().__init__(
            {
                "acc": TopLabelAccuracy(),
                # Inputs are checked once in `update`; softmax outputs need no per-metric re-check.
                "nll": NegativeLogLikelihood(num_classes, validate_args=False),
                "brier": BrierScore(num_classes, validate_args=False),
                "ece": ExpectedCalibrationError(num_classes, n_bins=n_bins, validate_args=False),
                "member_acc": MemberAccuracy(),
                "disagreement": Disagreement(validate_args=False),
                "mutual_information": MutualInformation(validate_args=False),
            },
            prefix=prefix,
            postfix=postfix,
            compute_groups=False,
        )
        self.num_classes = num_classes
        self.inputs = inputs

    def update(self, member_logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """``member_logits`` ``(M, B, C)`` (member probabilities when built with ``inputs="probs"``)."""
        kind = "logits" if self.inputs == "logits" else "probabilities"
        if not isinstance(member_logits, Tensor) or member_logits.dim() != 3:
            shape = tuple(member_logits.shape) if isinstance(member_logits, Tensor) else type(member_logits).__name__
            raise ValueError(
                f"`member_logits` must be (M, B, C) {kind} with the member axis first; got {shape}. "
                f"For a single model pass `{'logits' if kind == 'logits' else 'probs'}.unsqueeze(0)`."
            )
        if self.inputs == "logits":
            check_finite(member_logits, "member_logits")
            check_not_probs(
                member_logits,
                "member_logits",
                f"for member probabilities build the probs-taking set "
                f"ClassificationMetrics({self.num_classes}, inputs='probs')",
            )
        else:
            check_probs(member_logits, "member_probs", members=True)
        check_num_classes(member_logits, self.num_classes, "member_logits")
        check_targets(target, member_logits.shape[1], self.num_classes)
        member_probs = member_logits.detach().float()
        if self.inputs == "logits":
            member_probs = member_probs.softmax(-1)
        probs = member_probs.mean(0)
        for name, metric in self.items(keep_base=True, copy_state=False):
            if name in ("member_acc",):
                metric.update(member_probs, target)
            elif name in ("disagreement", "mutual_information"):
                metric.update(member_probs)
            else:
                metric.update(probs, target)

    def _with_samples(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key, value in values.items():
            base, post = (key[: -len(self.postfix)], self.postfix) if self.postfix else (key, "")
            if base.endswith("member_acc"):  # per-member values -> member_acc/<i>
                # reshape: torchmetrics squeezes a single member's (1,) result to a scalar.
                out.update({f"{base}/{i}{post}": v for i, v in enumerate(value.reshape(-1))})
            else:
                out[key] = value
        return out


class RegressionMetrics(_MetricSet):
    r"""Validation/test metrics of a Gaussian regression ensemble.

    Input contract: ``update(mean, var, target)`` with member means ``(M, B, ...)``, member
    variances ``(M, B, ...)`` (or ``None`` for point-prediction members: aleatoric variance 0) and
    ``target`` ``(B, ...)`` (a ``(B,)`` target for ``(M, B, 1)`` members is accepted). Members are
    combined into the moment-matched mixture (mean of means; variance = mean variance + variance of
    means, :func:`~lightning_ensembles.aggregate_gaussian`).

    ``compute()`` returns ``rmse``, ``nll`` (Gaussian NLL of the mixture's moments, per element) and
    ``coverage90`` (fraction of targets in the central 90% interval). Without samples every value is
    NaN and one :class:`~lightning_ensembles.metrics.NoSamplesWarning` names the set.

    Args:
        level: the nominal probability of the central interval whose coverage is reported (key
            ``coverage<100 * level>``).
        prefix: added before every key, e.g. ``"val/"``.
        postfix: added after every key.

    Example:
        >>> import torch
        >>> metrics = RegressionMetrics()
        >>> metrics.update(torch.randn(3, 16, 1), torch.ones(3, 16, 1), torch.randn(16))
        >>> sorted(metrics.compute())
        ['coverage90', 'nll', 'rmse']
    """

    _witness = "nll"

    def __init__(self, level: float = 0.9, prefix: str | None = None, postfix: str | None = None) -> None:
        from torchmetrics import MeanSquaredError

        super().__init__(
            {
                "rmse": MeanSquaredError(squared=False),
                "nll": GaussianNLL(),
                f"coverage{round(level * 100)}": IntervalCoverage(level),
            },
            prefix=prefix,
            postfix=postfix,
            compute_groups=False,
        )

    def update(self, mean: Tensor, var: Tensor | None, target: Tensor) -> None:  # type: ignore[override]
        if not isinstance(mean, Tensor) or mean.dim() < 2:
            raise ValueError("`mean` must be member means (M, B, ...) with the member axis first.")
        if var is not None and var.shape != mean.shape:
            raise ValueError(f"`var` {tuple(var.shape)} must match member means {tuple(mean.shape)}.")
        if target.dim() == 1 and mean.dim() == 3 and mean.shape[-1] == 1:
            target = target[:, None]
        if target.shape != mean.shape[1:]:
            raise ValueError(
                f"`target` {tuple(target.shape)} must have shape {tuple(mean.shape[1:])} (member means without M)."
            )
        mix = aggregate_gaussian(mean.detach().double(), None if var is None else var.detach().double())
        total = mix.variance.clamp_min(1e-12)
        target = target.double()
        for name, metric in self.items(keep_base=True, copy_state=False):
            if name == "rmse":
                metric.update(mix.mean, target)
            else:
                metric.update(mix.mean, total, target)
