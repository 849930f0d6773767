"""Input checks shared by the loss modules: clear errors that name the argument and the fix."""

from __future__ import annotations

from torch import Tensor

from .._checks import check_targets
from ..ensembles.base import check_member_outputs


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
