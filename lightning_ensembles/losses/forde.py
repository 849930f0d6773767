"""FoRDE: first-order repulsive deep ensembles (Trinh et al., ICLR 2024), repulsion of input gradients.

Members are pushed apart in the space of their input gradients: for each example ``x_b`` and member
``i``, ``g_i(x_b)`` is the gradient of member i's true-class logit with respect to the input,
normalised to unit length (``g / sqrt(||g||^2 + eps)``). With ``d2_ijb = ||g_i(x_b) - stopgrad(g_j(x_b))||^2``
and per-(j, b) bandwidth ``h_jb = median_i d2_ijb / log M``, the repulsion term is

    R = (1/B) sum_i log[(1/B) sum_j sum_b exp(-d2_ijb / h_jb)]

and FoRDE minimises ``sum_i mean_b CE_i + R``, differentiating through the input gradients (a
second-order term). These are the rules of the authors' code (AaltoPML/FoRDE, without its optional
PCA projection of the gradients).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_class_target, check_logits, check_shared_examples
from .base import Term

__all__ = ["member_input_gradients", "forde_repulsion", "InputGradientRepulsion"]


def member_input_gradients(ensemble: nn.Module, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Member outputs ``(M, B, C)`` and input gradients of each member's true-class logit ``(M, B, ...)``.

    The gradients keep their graph (``create_graph=True``) so a loss on them trains the weights. Runs
    the ensemble once with an input that requires grad; one backward per member is batched with
    ``is_grads_batched`` where autograd supports it, else a loop over members (same result).
    """
    x = inputs.detach().requires_grad_(True)
    outputs = ensemble(x)
    check_logits(outputs, "InputGradientRepulsion")
    check_class_target(outputs, target, "InputGradientRepulsion")
    m = outputs.shape[0]
    # (M,) scalars: member i's true-class logits summed over the batch. Samples do not interact (except
    # through train-mode BatchNorm, as in the reference code), so d s_i / d x_b is member i's g_i(x_b).
    s = outputs.gather(-1, target.view(1, -1, 1).expand(m, -1, 1)).squeeze(-1).sum(1)
    eye = torch.eye(m, dtype=s.dtype, device=s.device)
    try:
        (grads,) = torch.autograd.grad(s, x, grad_outputs=eye, is_grads_batched=True, create_graph=True)
    except RuntimeError:  # some ops have no batching rule for their backward; the loop runs anything
        grads = torch.stack([torch.autograd.grad(s[i], x, retain_graph=True, create_graph=True)[0] for i in range(m)])
    return outputs, grads


def forde_repulsion(input_grads: Tensor, eps: float = 1e-12) -> Tensor:
    """FoRDE's repulsion ``R`` (see the module docstring) from input gradients ``(M, B, ...)``."""
    m, b = input_grads.shape[:2]
    if m < 2:
        raise ValueError(
            f"FoRDE repulsion compares members, so it needs at least 2; got input gradients of shape "
            f"{tuple(input_grads.shape)}. Build the ensemble with num_members >= 2."
        )
    g = input_grads.reshape(m, b, -1)
    g = g / torch.sqrt(g.pow(2).sum(-1, keepdim=True) + eps)
    g = g.transpose(0, 1)  # (B, M, D): distances between members, per example
    ref = g.detach()
    sq = ((g * g).sum(-1, keepdim=True) + (ref * ref).sum(-1).unsqueeze(1) - 2.0 * g @ ref.transpose(1, 2)).clamp_min(
        0.0
    )  # (B, i, j)
    # Bandwidth per (j, b): median over i of the (stop-gradient) distances, divided by log M.
    # torch.quantile averages the two middle values for an even count, like jnp.median.
    h = torch.quantile(sq.detach(), 0.5, dim=1, keepdim=True) / math.log(m) + 1e-12  # (B, 1, j)
    log_kernel = -sq / h  # (B, i, j)
    per_member = torch.logsumexp(log_kernel.permute(1, 0, 2).reshape(m, -1), dim=1) - math.log(b)
    return per_member.sum() / b


class InputGradientRepulsion(Term):
    """FoRDE's input-gradient repulsion as a regulariser (value ``R / M``; see :func:`forde_repulsion`).

    ``EnsembleClassifier`` minimises ``M * (mean_i CE_i + weight * value) = sum_i CE_i + weight * R``,
    so ``weight = 1`` is the paper's objective. Needs ``inputs``, ``target`` and ``ensemble``: it runs
    the ensemble a second time on an input that requires grad (about 3-4x the step cost of plain
    training, see ``benchmarks/diversity.py``; BatchNorm running statistics see the batch twice).
    Works with every ensemble whose output is differentiable in its input.

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off. ``1``
            is the paper's objective.
        eps: added under the square root when normalising the gradients.
        name: logged as ``train/<name>``; default ``"forde"``.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble("mlp", num_members=3, backbone_kwargs={"in_features": 4, "out_features": 2})
        >>> x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
        >>> value = InputGradientRepulsion(weight=1.0)(ens(x), y, inputs=x, ensemble=ens)
        >>> value.backward()  # second-order: gradients reach the weights through the input gradients
        >>> ens.stacked_parameters()["net.1.weight"].grad.abs().sum() > 0
        tensor(True)
    """

    compares_examples = False  # checked in term(), once `inputs` is known to be given

    def __init__(self, weight: float = 0.0, eps: float = 1e-12, name: str | None = "forde") -> None:
        super().__init__(weight, name)
        self.eps = eps

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        if inputs is None or ensemble is None:
            raise ValueError(
                "InputGradientRepulsion needs `inputs` (the batch) and `ensemble` to take input gradients; "
                "EnsembleClassifier passes both. Called by hand: reg(outputs, target, inputs=x, ensemble=ens)."
            )
        check_shared_examples(outputs, inputs, "InputGradientRepulsion")
        check_logits(outputs, "InputGradientRepulsion")
        target = check_class_target(outputs, target, "InputGradientRepulsion")
        _, grads = member_input_gradients(ensemble, inputs, target)
        return forde_repulsion(grads, self.eps) / grads.shape[0]
