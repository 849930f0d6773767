"""Calibration errors: top-label ECE (equal width), adaptive ECE (equal mass), classwise ECE."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from .._checks import as_float, check_choice, check_norm, check_positive_int, check_probs_targets
from ._empty import NaNWhenEmpty, cat_state, no_samples
from ._plot import check_plottable, plot_bins, start_plot, synced
from ._running import add_sums

Norm = Literal["l1", "l2", "max"]
_NORM_NAME = {"l1": "ECE", "l2": "L2 calibration error", "max": "MCE"}


def bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each confidence, exactly as torchmetrics bins: ``[lo, hi)``, ``1.0`` -> bin ``n_bins``.

    Boundaries are ``torch.linspace(0, 1, n_bins + 1)`` in the input's dtype, so values on a boundary
    land in the same bin as in ``torchmetrics.classification.MulticlassCalibrationError``; a confidence
    of exactly 1 gets the extra top bin ``[1, 1]`` (torchmetrics' behaviour too).
    """
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    return torch.bucketize(conf, boundaries, right=True) - 1


def calibration_error_from_bins(count: Tensor, conf_sum: Tensor, acc_sum: Tensor, norm: Norm) -> Tensor:
    """Calibration error from per-bin sample counts, confidence sums and accuracy sums (last axis = bins)."""
    total = count.sum(-1, keepdim=True).clamp_min(1)
    safe = count.clamp_min(1)
    gap = (acc_sum - conf_sum).abs() / safe  # |acc(B) - conf(B)|, 0 in empty bins
    prop = count / total
    if norm == "l1":
        return (gap * prop).sum(-1)
    if norm == "l2":
        return ((gap**2) * prop).sum(-1).sqrt()
    return gap.amax(-1)


def column_bin_sums(p: Tensor, hit: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per column ``k`` of ``(B, K)`` probabilities ``p`` and 0/1 outcomes ``hit``: the sample count, the sum of
    ``p`` and the sum of ``hit`` in each :func:`bin_index` bin, float64 ``(K, n_bins + 1)`` tensors each.

    ``p`` is binned in its own dtype; one flat ``bincount`` over (column, bin) pairs, no loop over columns.
    """
    k, size = p.shape[-1], n_bins + 1
    flat = (bin_index(p, n_bins) + torch.arange(k, device=p.device) * size).reshape(-1)
    n = k * size
    count = torch.bincount(flat, minlength=n).to(torch.float64).view(k, size)
    conf_sum = torch.bincount(flat, weights=p.reshape(-1).double(), minlength=n).view(k, size)
    acc_sum = torch.bincount(flat, weights=hit.reshape(-1).double(), minlength=n).view(k, size)
    return count, conf_sum, acc_sum


class _Calibration(NaNWhenEmpty, Metric):
    """The arguments and input check every calibration error here shares."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self, num_classes: int | None, n_bins: int, norm: Norm, validate_args: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.validate_args = validate_args
        check_positive_int(n_bins, "n_bins")
        check_norm(norm)
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.norm = norm

    def _check(self, probs: Tensor, target: Tensor) -> int:
        """The number of classes; with ``validate_args`` after checking ``probs`` and ``target``."""
        if not self.validate_args:
            return probs.shape[-1]
        return check_probs_targets(probs, target, self.num_classes)


class _BinnedCalibration(_Calibration):
    """Keeps ``(..., n_bins + 1)`` sums of counts, confidences and accuracies: memory independent of N."""

    count: Tensor
    conf_sum: Tensor
    acc_sum: Tensor

    #: ``"mean"``: ``compute()`` averages the per-class (per-label) errors; ``"none"`` returns them as they are.
    reduction: str = "none"

    def __init__(
        self,
        num_classes: int | None,
        n_bins: int,
        norm: Norm,
        shape: tuple[int, ...],
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, n_bins, norm, validate_args, **kwargs)
        if num_classes is not None:
            check_positive_int(num_classes, "num_classes")
        # float64 sums: a million float32 confidences summed in float32 would drift by ~1e-4.
        add_sums(self, "count", "conf_sum", "acc_sum", shape=(*shape, n_bins + 1))

    #: Axis labels and title prefix of the reliability diagram drawn by :meth:`plot`.
    _plot_labels = ("confidence (top-label probability)", "accuracy", "")

    def _add_bins(self, p: Tensor, hit: Tensor) -> None:
        """Add ``(B, K)`` probabilities and 0/1 outcomes to the bins (column ``k``: row ``k`` of the sums)."""
        count, conf_sum, acc_sum = column_bin_sums(p, hit, self.n_bins)
        self.count += count.view(self.count.shape)
        self.conf_sum += conf_sum.view(self.conf_sum.shape)
        self.acc_sum += acc_sum.view(self.acc_sum.shape)

    def pooled_bins(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(count, mean confidence, accuracy)`` per bin, pooled over classes (``n_bins + 1`` entries each)."""
        lead = tuple(range(self.count.dim() - 1))
        count, conf_sum, acc_sum = (t.sum(lead) if lead else t for t in (self.count, self.conf_sum, self.acc_sum))
        safe = count.clamp_min(1)
        return count, conf_sum / safe, acc_sum / safe

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Reliability diagram from the stored bins: ``(fig, ax)`` (torchmetrics' ``Metric.plot`` contract).

        Bars are the accuracy of each non-empty equal-width bin (for the classwise error: the frequency
        of class ``k`` among samples whose ``p_k`` falls in the bin, pooled over classes; for the
        multilabel error: the frequency of ``y_l = 1`` among (sample, label) pairs, pooled over labels),
        hatched bars the gap to the bin's mean confidence, the dashed line perfect calibration; the title
        holds ``val`` (default: ``compute()``; per-class values: their mean). Without ``ax`` a new figure
        also shows the fraction of samples per bin below the diagram; with ``ax`` only the diagram is drawn
        into it. Bins are summed over processes first. Needs matplotlib
        (``pip install 'lightning-ensembles[plots]'``).
        """
        with synced(self):
            count, conf, acc = (t.detach().clone() for t in self.pooled_bins())
        xlabel, ylabel, prefix = self._plot_labels
        return plot_bins(self, val, ax, (count, conf, acc), prefix + _NORM_NAME[self.norm], xlabel, ylabel)

    def compute(self) -> Tensor:
        if not bool(self.count.sum() > 0):
            return no_samples(self, self.count.device)
        errors = calibration_error_from_bins(self.count, self.conf_sum, self.acc_sum, self.norm).float()
        return errors.mean() if self.reduction == "mean" else errors


class ExpectedCalibrationError(_BinnedCalibration):
    r"""Top-label expected calibration error with equal-width bins (Guo et al., 2017).

    ``ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` (``norm="l1"``); ``"l2"`` takes the root of the
    count-weighted mean squared gap, ``"max"`` the largest gap (MCE). Bins are ``[lo, hi)`` with a
    confidence of exactly 1 in its own top bin, identical to torchmetrics'
    ``MulticlassCalibrationError`` (Guo's code uses ``(lo, hi]``; the two differ only for
    confidences that fall exactly on a boundary). Memory is constant: only per-bin sums are kept.

    Inputs: ``probs`` ``(B, C)`` probabilities (rows sum to 1), ``target`` ``(B,)`` class indices.

    Args:
        num_classes: C, checked against the last axis of ``probs`` when given (default: any).
        n_bins: the number of equal-width bins on [0, 1].
        norm: ``"l1"`` (ECE), ``"l2"`` or ``"max"`` (MCE).
        validate_args: check the inputs of ``update`` (two passes over the probabilities); ``False`` skips
            the checks for speed.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> probs = torch.tensor([[.95, .05], [.85, .15], [.65, .35], [.55, .45], [.25, .75], [.15, .85]])
        >>> ece = ExpectedCalibrationError(n_bins=15)
        >>> ece.update(probs, torch.tensor([0, 1, 0, 0, 1, 0]))
        >>> round(float(ece.compute()), 4)
        0.4667
        >>> fig, ax = ece.plot()  # reliability diagram (matplotlib: the `plots` extra)
        >>> [round(float(bar.get_height()), 2) for bar in ax.containers[0]]  # accuracy of each non-empty bin
        [1.0, 1.0, 1.0, 0.0, 1.0]
    """

    def __init__(
        self,
        num_classes: int | None = None,
        n_bins: int = 15,
        norm: Norm = "l1",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, n_bins, norm, (), validate_args, **kwargs)

    def update(self, probs: Tensor, target: Tensor) -> None:
        self._check(probs, target)
        conf, pred = as_float(probs).max(-1)
        self._add_bins(conf[:, None], (pred == target)[:, None])

    def bins(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(count, mean confidence, accuracy)`` per bin (the last bin holds confidences equal to 1)."""
        return self.pooled_bins()


class _ColumnwiseCalibration(_BinnedCalibration):
    """One calibration error per column of ``(B, K)`` probabilities (classes, labels), or their mean."""

    def __init__(
        self, columns: int, n_bins: int, norm: Norm, reduction: str, validate_args: bool = True, **kwargs: Any
    ) -> None:
        check_choice("reduction", reduction, ("mean", "none"))
        super().__init__(columns, n_bins, norm, (columns,), validate_args, **kwargs)
        self.reduction = reduction


class ClasswiseCalibrationError(_ColumnwiseCalibration):
    r"""Classwise ECE (Kull et al., 2019): for each class k, equal-width bins on ``p_k`` compare the
    mean ``p_k`` with the frequency of class k; the per-class errors are averaged over classes.

    Binning per class is the same as :class:`ExpectedCalibrationError`, so the value equals
    torch-uncertainty's ``ClasswiseCalibrationError`` (which stores every probability); here only
    ``(C, n_bins + 1)`` sums are kept. ``reduction="none"`` returns the ``(C,)`` per-class errors.

    Args:
        num_classes: the number of classes C (required: one set of bins per class).
        n_bins: equal-width bins per class on [0, 1].
        norm: ``"l1"``, ``"l2"`` or ``"max"``, applied to each class's bins.
        reduction: ``"mean"`` (default) averages the per-class errors, ``"none"`` returns all ``C``.
        validate_args: ``False`` skips the input checks of ``update``.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> m = ClasswiseCalibrationError(num_classes=2, n_bins=10)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        >>> round(float(m.compute()), 4)
        0.45
    """

    _plot_labels = ("predicted probability p_k (every class k)", "frequency of class k", "classwise ")

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        norm: Norm = "l1",
        reduction: Literal["mean", "none"] = "mean",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        check_positive_int(num_classes, "num_classes")
        super().__init__(num_classes, n_bins, norm, reduction, validate_args, **kwargs)

    def update(self, probs: Tensor, target: Tensor) -> None:
        c = self._check(probs, target)
        self._add_bins(as_float(probs), torch.nn.functional.one_hot(target, c))


class AdaptiveCalibrationError(_Calibration):
    r"""Calibration error with equal-mass (adaptive) bins.

    ``top_label=True`` (default): sort the top-label confidences, split them into ``n_bins`` bins of
    (nearly) equal size (``torch.tensor_split`` rule: the first ``N % n_bins`` bins get one extra
    sample), and take the count-weighted gap between accuracy and mean confidence. On confidences
    without ties this is torch-uncertainty's ``AdaptiveCalibrationError``.

    Tied confidences: which of the tied samples fall on either side of a bin boundary would depend
    on their input order (torch-uncertainty's value does). Here the samples of one tied group are one
    unit: each of them carries the group's mean accuracy, so a group that straddles a boundary is
    shared among its bins in proportion, and any order of the same predictions gives the same value.

    ``top_label=False``: Nixon et al.'s ACE ("Measuring calibration in deep learning", 2019), which
    bins every class's probability ``p_k`` separately with equal-mass bins and averages the gaps over
    classes. torch-uncertainty calls its top-label variant "adaptive" too: the two definitions differ.

    Equal-mass bins depend on the whole sample, so this metric stores the confidences (top-label:
    2 floats per sample; classwise: ``C + 1`` per sample) and sorts them at ``compute``.

    Args:
        num_classes: the number of classes C, or ``None`` to take it from each batch.
        n_bins: the number of equal-mass bins (per class with ``top_label=False``).
        norm: ``"l1"``, ``"l2"`` or ``"max"`` over the bins' gaps.
        top_label: bin the top-label confidence (default) or, ``False``, every class's probability (ACE).
        validate_args: whether ``update`` checks ``probs`` and ``target``.
        **kwargs: options of ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> m = AdaptiveCalibrationError(n_bins=2)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]), torch.tensor([0, 1, 0, 0]))
        >>> round(float(m.compute()), 4)
        0.15
    """

    confidences: list[Tensor]
    accuracies: list[Tensor]

    def __init__(
        self,
        num_classes: int | None = None,
        n_bins: int = 15,
        norm: Norm = "l1",
        top_label: bool = True,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, n_bins, norm, validate_args, **kwargs)
        self.top_label = top_label
        self.add_state("confidences", [], dist_reduce_fx="cat")
        self.add_state("accuracies", [], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        c = self._check(probs, target)
        probs = as_float(probs)
        if self.top_label:
            conf, pred = probs.max(-1)
            self.confidences.append(conf.float())
            self.accuracies.append((pred == target).float())
        else:
            self.confidences.append(probs.float())
            self.accuracies.append(torch.nn.functional.one_hot(target, c).float())

    def _adaptive(self, conf: Tensor, acc: Tensor) -> Tensor:
        return calibration_error_from_bins(*self._adaptive_bins(conf, acc), self.norm)

    def _adaptive_bins(self, conf: Tensor, acc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(count, confidence sum, accuracy sum)`` of the ``n_bins`` equal-mass bins of one set of confidences."""
        conf, order = conf.double().sort()
        acc = acc.double()[order]
        n = conf.numel()
        # Tied confidences share their group's mean accuracy (exact sums of 0/1: independent of order).
        _, group, size = torch.unique_consecutive(conf, return_inverse=True, return_counts=True)
        group_hits = torch.zeros(size.numel(), dtype=torch.float64, device=conf.device).index_add_(0, group, acc)
        acc = (group_hits / size)[group]
        # Bin b holds sorted samples [start_b, end_b): the tensor_split rule.
        sizes = torch.full((self.n_bins,), n // self.n_bins, dtype=torch.long)
        sizes[: n % self.n_bins] += 1
        idx = torch.repeat_interleave(torch.arange(self.n_bins), sizes).to(conf.device)
        count = sizes.to(conf.device, torch.float64)
        conf_sum = torch.zeros(self.n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf)
        acc_sum = torch.zeros(self.n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, acc)
        return count, conf_sum, acc_sum

    def curves(self) -> list[tuple[Tensor, Tensor]]:
        """``(mean confidence, accuracy)`` of every non-empty equal-mass bin: one curve (top-label) or one per class.

        Reads the local state; :meth:`plot` gathers it over processes first.
        """
        conf, acc = cat_state(self.confidences), cat_state(self.accuracies)
        if conf.numel() == 0:
            return []
        columns = [(conf, acc)] if self.top_label else [(conf[:, k], acc[:, k]) for k in range(conf.shape[1])]
        out = []
        for c, a in columns:
            count, conf_sum, acc_sum = self._adaptive_bins(c, a)
            seen = count > 0  # fewer samples than bins leaves bins empty
            out.append((conf_sum[seen] / count[seen], acc_sum[seen] / count[seen]))
        return out

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Reliability curve of the equal-mass bins: ``(fig, ax)`` (torchmetrics' ``Metric.plot`` contract).

        One point per bin at (mean confidence, accuracy), which :meth:`curves` returns (bins of unequal
        width, so points rather than bars); with ``top_label=False`` one line per class (``p_k`` against
        the frequency of class ``k``). The title holds ``val`` (default: ``compute()``). Needs matplotlib.
        """
        with synced(self):
            curves = [(x.clone(), y.clone()) for x, y in self.curves()]
        check_plottable(self, bool(curves))
        value, fig, ax = start_plot(self, val, ax)
        many = len(curves) > 10  # a legend entry per class only while it stays readable
        for k, (x, y) in enumerate(curves):
            label = "equal-mass bins" if self.top_label else (None if many else f"class {k}")
            ax.plot(x.cpu().numpy(), y.cpu().numpy(), marker="o", ms=4, label=label)
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-label probability)" if self.top_label else "predicted probability p_k")
        ax.set_ylabel("accuracy" if self.top_label else "frequency of class k")
        ax.set_title(f"adaptive {_NORM_NAME[self.norm]} = {100 * value:.2f}%")
        ax.legend(loc="upper left")
        return fig, ax

    def compute(self) -> Tensor:
        conf = cat_state(self.confidences)
        acc = cat_state(self.accuracies)
        if conf.numel() == 0:
            return no_samples(self, self.device)
        if self.top_label:
            return self._adaptive(conf, acc).float()
        return torch.stack([self._adaptive(conf[:, k], acc[:, k]) for k in range(conf.shape[1])]).mean().float()
