"""The package's input checks: every bad input is a ``ValueError`` that names the argument and the fix.

One home for validation (issue 22): the metrics, losses, calibration and modules all check through here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import torch
from torch import Tensor

_T = TypeVar("_T")


def _spoken(choices: Iterable[object]) -> str:
    """``'a', 'b' or 'c'``: the choices as a reader says them."""
    names = [repr(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_choice(name: str, value: _T, choices: Iterable[object], hint: str = "") -> _T:
    """Return ``value`` if it is one of ``choices``; otherwise a ``ValueError`` naming ``name`` and the choices.

    ``hint`` is appended to the message (the fix, when it is more than "pick one of these").

    Example:
        >>> check_choice("reduction", "mean", ("mean", "sum"))
        'mean'
        >>> check_choice("reduction", "avg", ("mean", "sum"))
        Traceback (most recent call last):
        ...
        ValueError: `reduction` must be 'mean' or 'sum', got 'avg'.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be {_spoken(choices)}, got {value!r}.{' ' + hint if hint else ''}")
    return value


#: Smallest tolerance on ``probs.sum(-1) == 1`` (float32 and float64 inputs): it also lets through
#: probabilities written with a few decimals. Lower-precision inputs get more, see :func:`sum_tolerance`.
SUM_ATOL = 1e-3
#: Ulps of the input dtype allowed for rounding each softmax output (measured: bfloat16 and float16
#: softmax rows are off by at most ~0.4 ulp of 1).
ROUNDING_ULPS = 4


def sum_tolerance(dtype: torch.dtype, num_classes: int) -> float:
    """Largest accepted ``|probs.sum(-1) - 1|`` for probabilities of ``dtype`` over ``num_classes`` classes.

    ``max(SUM_ATOL, 4 * eps(dtype), num_classes * eps(accumulation dtype))``: rounding each output to
    ``dtype`` moves a row sum by at most ~1 ulp of 1 (``eps``: 0.0078 for bfloat16, 0.00098 for float16),
    and the softmax normaliser is summed over the classes in float32 (float64 for float64 inputs).
    Sums are always checked in float64. bfloat16 over 10 classes: 0.031; float32 up to 8,388 classes: 0.001.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return max(SUM_ATOL, ROUNDING_ULPS * eps, num_classes * acc)


def as_float(probs: Tensor) -> Tensor:
    """Half-precision inputs in float32 for the arithmetic (exact: every bf16/fp16 value is a float32)."""
    return probs.float() if probs.is_floating_point() and probs.element_size() < 4 else probs


def check_not_probs(logits: Tensor, name: str, fix: str) -> None:
    """Refuse ``logits`` that look like probabilities: every value in [0, 1], every row summing to 1.

    ``fix`` is the remedy named in the error (e.g. the probs-taking metric to use instead). Real logits
    pass unless a whole batch happens to be normalised rows: one ``aminmax`` pass in the common case.
    A single class (every probability row is ``[1]``) and empty batches are not checked.
    """
    c = logits.shape[-1]
    if logits.numel() == 0 or c < 2 or not logits.is_floating_point():
        return
    lo, hi = torch.aminmax(logits.detach())
    if not (bool(lo >= 0) and bool(hi <= 1)):
        return
    err = (logits.detach().double().sum(-1) - 1).abs().max()
    if bool(err <= sum_tolerance(logits.dtype, c)):
        raise ValueError(
            f"`{name}` should be logits, but these look like probabilities: every value is in [0, 1] and every "
            f"row sums to 1 (largest deviation {float(err):.2g}). Pass logits, or {fix}."
        )


def check_finite(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"`{name}` contains {n_bad} NaN or infinite value(s); check the model outputs.")


def check_probs(probs: Tensor, name: str = "probs", members: bool = False) -> None:
    """``probs`` must be ``(B, C)`` (or ``(M, B, C)`` with ``members``) finite probabilities summing to 1.

    Row sums are taken in float64 and compared with :func:`sum_tolerance` of the dtype of ``probs``.
    """
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
    tol = sum_tolerance(probs.dtype, probs.shape[-1])
    # One reduction pass catches NaN (the comparison is False), negatives, values > 1 and bad sums.
    lo, hi = torch.aminmax(probs)
    sums = probs.sum(-1, dtype=torch.float64)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        check_finite(probs, name)
    if bool(lo < 0) or bool(hi > 1 + tol):
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1]; got values in [{float(lo):.4g}, {float(hi):.4g}]. "
            "Pass `logits.softmax(-1)`, not logits."
        )
    err = (sums - 1).abs().max() if sums.numel() else sums.new_zeros(())
    if not bool(err <= tol):
        check_finite(probs, name)
        raise ValueError(
            f"`{name}` rows must sum to 1 over the last (class) axis; the largest deviation is {float(err):.4g} "
            f"(tolerance {tol:.2g} for {probs.dtype} over {probs.shape[-1]} classes). "
            "Pass `logits.softmax(-1)` (or normalise the probabilities)."
        )


def check_targets(
    target: Tensor, batch: int, num_classes: int, name: str = "target", prefix: str = "", hint: str = ""
) -> None:
    """``target`` must be ``(B,)`` integer class indices in ``[0, num_classes)``.

    ``prefix`` starts every message (e.g. ``"JensenGap: "``, the caller's name); ``hint`` ends the
    out-of-range message (the fix when the classes do not match, e.g. the model's number of outputs).

    Example:
        >>> check_targets(torch.tensor([0, 2]), batch=2, num_classes=3)
        >>> check_targets(torch.tensor([0, 3]), batch=2, num_classes=3, prefix="JensenGap: ")
        Traceback (most recent call last):
        ...
        ValueError: JensenGap: `target` values must lie in [0, 2] for 3 classes; got values in [0, 3].
    """
    if not isinstance(target, Tensor):
        raise ValueError(f"{prefix}`{name}` must be a torch.Tensor, got {type(target).__name__}.")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(
            f"{prefix}`{name}` and the predictions do not fit: expected class indices of shape ({batch},), got "
            f"shape {tuple(target.shape)}. One-hot targets: pass `target.argmax(-1)`."
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"{prefix}`{name}` must hold integer class indices (torch.long), got dtype {target.dtype}.")
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{prefix}`{name}` values must lie in [0, {num_classes - 1}] for {num_classes} classes; got values "
                f"in [{lo}, {hi}].{' ' + hint if hint else ''}"
            )


def check_num_classes(probs: Tensor, num_classes: int | None, name: str = "probs") -> int:
    """The number of classes on the last axis of ``probs``; a ``ValueError`` when it is not ``num_classes``."""
    c = probs.shape[-1]
    if num_classes is not None and c != num_classes:
        raise ValueError(
            f"`{name}` has {c} classes on its last axis, but the metric was built with num_classes={num_classes}."
        )
    return c


def check_probs_targets(probs: Tensor, target: Tensor, num_classes: int | None = None) -> int:
    """``(B, C)`` probabilities (:func:`check_probs`) with ``C == num_classes`` when given, and ``(B,)`` class
    indices in ``[0, C)`` (:func:`check_targets`); returns ``C``."""
    check_probs(probs)
    c = check_num_classes(probs, num_classes)
    check_targets(target, probs.shape[0], c)
    return c


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"`{name_a}` {tuple(a.shape)} and `{name_b}` {tuple(b.shape)} must have the same shape.")


def check_positive_int(value: int, name: str, hint: str = "") -> None:
    """``value`` must be an ``int`` (not a ``bool``) >= 1; ``hint`` is appended to the message."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.{' ' + hint if hint else ''}")


def check_norm(norm: str) -> None:
    check_choice("norm", norm, ("l1", "l2", "max"))


# ---------------------------------------------------------------- member outputs (ensembles, losses)
def check_member_outputs(outputs: Tensor, num_members: int | None = None, name: str = "outputs") -> None:
    """Raise a ``ValueError`` unless ``outputs`` has the member axis first, ``(M, B, ...)``."""
    if not isinstance(outputs, Tensor):
        raise ValueError(f"`{name}` must be a tensor of member outputs (M, B, ...), got {type(outputs).__name__}.")
    if outputs.dim() < 2:
        raise ValueError(
            f"`{name}` must have the member axis first, shape (M, B, ...); got shape {tuple(outputs.shape)}. "
            "Stack single-model outputs with `outputs.unsqueeze(0)`."
        )
    if num_members is not None and outputs.shape[0] != num_members:
        raise ValueError(f"`{name}` has {outputs.shape[0]} members on axis 0, expected {num_members}.")


def check_pairwise(outputs: Tensor, term: str, name: str = "outputs") -> None:
    """``ValueError`` unless ``outputs`` is ``(M, B, ...)`` with at least two members."""
    check_member_outputs(outputs, name=name)
    if outputs.shape[0] < 2:
        raise ValueError(
            f"{term} compares members, so `{name}` needs at least 2 members on axis 0; got shape "
            f"{tuple(outputs.shape)}. Build the ensemble with num_members >= 2, or drop this regularizer."
        )


def check_logits(outputs: Tensor, term: str, pairwise: bool = True) -> None:
    """``ValueError`` unless ``outputs`` is ``(M, B, C)`` member logits (C >= 2)."""
    if pairwise:
        check_pairwise(outputs, term)
    else:
        check_member_outputs(outputs)
    if outputs.dim() != 3 or outputs.shape[-1] < 2:
        raise ValueError(
            f"{term} expects member logits of shape (M, B, C) with C >= 2 classes; got {tuple(outputs.shape)}. "
            "For regression outputs use NegativeCorrelation."
        )


def check_class_target(outputs: Tensor, target: Tensor | None, term: str) -> Tensor:
    """Return ``target`` after checking it holds one class index per sample of ``outputs`` ``(M, B, C)``."""
    if target is None:
        raise ValueError(f"{term} needs class targets: pass `target` of shape ({outputs.shape[1]},).")
    check_targets(target, outputs.shape[1], outputs.shape[-1], prefix=f"{term}: ")
    return target


def check_same_batch(outputs: Tensor, other: Tensor | None, what: str, term: str) -> None:
    """``ValueError`` unless ``other`` (if given) has the batch size of ``outputs`` on its first axis."""
    if other is not None and (other.dim() == 0 or other.shape[0] != outputs.shape[1]):
        raise ValueError(
            f"{term}: `{what}` of shape {tuple(other.shape)} does not match the batch of member outputs "
            f"{tuple(outputs.shape)}; its first axis must be the batch size {outputs.shape[1]}."
        )


def check_shared_examples(outputs: Tensor, inputs: Tensor | None, term: str) -> None:
    """``ValueError`` if members did not all predict the same examples (``outputs.shape[1] != len(inputs)``).

    Diversity and repulsion compare members *on the same example*; an ensemble that splits the batch
    among members in training (``BatchEnsemble(batch_mode="split")``) gives each member other examples.
    """
    if inputs is not None and inputs.dim() > 0 and outputs.dim() >= 2 and inputs.shape[0] != outputs.shape[1]:
        raise ValueError(
            f"{term} compares members on the same examples, but the member outputs {tuple(outputs.shape)} cover "
            f"{outputs.shape[1]} examples and the batch `inputs` has {inputs.shape[0]}. An ensemble that splits the "
            "batch among members (e.g. BatchEnsemble(batch_mode='split')) gives each member different examples: "
            "use batch_mode='repeat' with this regularizer."
        )
