"""Input validation shared by the metrics: every bad input is a ``ValueError`` that says what was wrong."""

from __future__ import annotations

import torch
from torch import Tensor

#: Tolerance on ``probs.sum(-1) == 1``; float32 softmax outputs over 1,000 classes stay well inside it.
SUM_ATOL = 1e-3


def check_finite(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"`{name}` contains {n_bad} NaN or infinite value(s); check the model outputs.")


def check_probs(probs: Tensor, name: str = "probs", members: bool = False) -> None:
    """``probs`` must be ``(B, C)`` (or ``(M, B, C)`` with ``members``) finite probabilities summing to 1."""
    if not isinstance(probs, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(probs).__name__}.")
    want = 3 if members else 2
    shape = "(M, B, C) member probabilities" if members else "(B, C) probabilities"
    if probs.dim() != want:
        raise ValueError(f"`{name}` must have shape {shape}; got shape {tuple(probs.shape)}.")
    if not probs.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor of probabilities, got dtype {probs.dtype}.")
    if probs.numel() == 0:
        return
    # One reduction pass catches NaN (the comparison is False), negatives, values > 1 and bad sums.
    lo, hi = torch.aminmax(probs)
    sums = probs.sum(-1)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        check_finite(probs, name)
    if bool(lo < 0) or bool(hi > 1 + SUM_ATOL):
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1]; got values in [{float(lo):.4g}, {float(hi):.4g}]. "
            "Pass `logits.softmax(-1)`, not logits."
        )
    err = (sums - 1).abs().max() if sums.numel() else sums.new_zeros(())
    if not bool(err <= SUM_ATOL):
        check_finite(probs, name)
        raise ValueError(
            f"`{name}` rows must sum to 1 over the last (class) axis; the largest deviation is {float(err):.4g}. "
            "Pass `logits.softmax(-1)` (or normalise the probabilities)."
        )


def check_targets(target: Tensor, batch: int, num_classes: int, name: str = "target") -> None:
    """``target`` must be ``(B,)`` integer class indices in ``[0, num_classes)``."""
    if not isinstance(target, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(target).__name__}.")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(
            f"`{name}` must be class indices of shape ({batch},) to match the predictions; got shape "
            f"{tuple(target.shape)}. One-hot targets: pass `target.argmax(-1)`."
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer class indices (torch.long), got dtype {target.dtype}.")
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"`{name}` values must lie in [0, {num_classes - 1}] for {num_classes} classes; got values in [{lo}, {hi}]."
            )


def check_num_classes(probs: Tensor, num_classes: int | None, name: str = "probs") -> int:
    c = probs.shape[-1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f"`{name}` has {c} classes on its last axis, but the metric was built with num_classes={num_classes}.")
    return c


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"`{name_a}` {tuple(a.shape)} and `{name_b}` {tuple(b.shape)} must have the same shape.")


def check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def check_norm(norm: str) -> None:
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"`norm` must be 'l1', 'l2' or 'max', got {norm!r}.")
