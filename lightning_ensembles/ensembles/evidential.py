"""Evidential heads: turn a backbone's head into a Dirichlet (classification) or Normal-Inverse-Gamma (regression) one.

The converted backbone is a plain ``nn.Module``, so every ensemble method here builds on it as on any
backbone (``DeepEnsemble(DirichletHead(net))``, ``PackedEnsemble(NIGHead(net), ...)``, ...), and member
outputs keep the ``(M, B, ...)`` contract:

- :class:`DirichletHead` outputs ``log alpha`` ``(B, C)`` with ``alpha = evidence(z) + 1`` (Sensoy et al.,
  2018; ``evidence`` = ``softplus`` (default), ``relu`` or ``exp``). Because
  ``softmax(log alpha) = alpha / S`` is the Dirichlet's expected probability, these outputs are used as
  logits everywhere (ensemble = mean of member expected probabilities; NLL, ECE, OOD scores unchanged);
  the vacuity ``K / S`` is ``C / exp(outputs).sum(-1)``.
- :class:`NIGHead` widens the backbone's output ``Linear`` (``D -> 4 D`` outputs; the first ``D`` rows
  keep the original weights as ``gamma``) and outputs ``(gamma, nu, alpha, beta)`` concatenated,
  ``(B, 4 D)``, constrained by ``softplus``: ``nu > 0``, ``alpha > 1``, ``beta > 0`` (Amini et al., 2020).

Both accept a built module or a backbone name with ``backbone_kwargs`` (as the modules do), so they are
configurable from YAML: ``backbone: lightning_ensembles.ensembles.evidential.DirichletHead`` with
``backbone_kwargs: {backbone: mlp, backbone_kwargs: {...}}``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice
from ..backbones import resolve_backbone
from ..losses.evidential import nig_constrain
from .surgery import set_submodule

__all__ = ["DirichletHead", "NIGHead", "evidential_head"]

_EVIDENCE = ("softplus", "relu", "exp")


class DirichletHead(nn.Module):
    """A backbone whose outputs ``z`` become ``log alpha = log(evidence(z) + 1)`` (Dirichlet parameters, as logits).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> head = DirichletHead(nn.Linear(4, 3))
        >>> log_alpha = head(torch.randn(5, 4))
        >>> bool((log_alpha >= 0).all())  # alpha >= 1
        True
        >>> torch.allclose(log_alpha.softmax(-1), log_alpha.exp() / log_alpha.exp().sum(-1, keepdim=True))
        True

    Args:
        backbone: the network, or a backbone name built with ``backbone_kwargs``.
        activation: the evidence function, ``"softplus"``, ``"relu"`` or ``"exp"``.
        backbone_kwargs: arguments building ``backbone`` when it is a name.
    """

    def __init__(
        self, backbone: nn.Module | str, activation: str = "softplus", backbone_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        check_choice("activation", activation, _EVIDENCE, "It is the evidence function.")
        self.backbone = resolve_backbone(backbone, backbone_kwargs)
        self.activation = activation

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        z = self.backbone(*args, **kwargs)
        if self.activation == "softplus":
            evidence = F.softplus(z)
        elif self.activation == "relu":
            evidence = F.relu(z)
        else:  # log(exp(z) + 1) is softplus(z) itself, computed stably
            return F.softplus(z)
        return torch.log1p(evidence)

    def extra_repr(self) -> str:
        return f"evidence={self.activation}"


class NIGHead(nn.Module):
    """A backbone whose output ``Linear`` (``head``: its path; default the last ``nn.Linear``) gives NIG parameters.

    Output ``(B, 4 D)``: ``gamma`` (the original head's ``D`` outputs), ``nu``, ``alpha``, ``beta``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = NIGHead(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)))
        >>> gamma, nu, alpha, beta = net(torch.randn(5, 2)).chunk(4, -1)
        >>> gamma.shape, bool((nu > 0).all() and (alpha > 1).all() and (beta > 0).all())
        (torch.Size([5, 1]), True)

    Args:
        backbone: the network, or a backbone name built with ``backbone_kwargs``.
        head: path of the output ``nn.Linear`` (default: the last one).
        backbone_kwargs: arguments building ``backbone`` when it is a name.
    """

    def __init__(
        self, backbone: nn.Module | str, head: str | None = None, backbone_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        model = resolve_backbone(backbone, backbone_kwargs)
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if head is None:
            if not linears:
                raise ValueError(
                    f"NIGHead found no nn.Linear output layer in {type(model).__name__}; give the path of the output "
                    "layer with `head=` (it must be an nn.Linear)."
                )
            head = linears[-1]
        layer = model.get_submodule(head) if head else model
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"NIGHead: the head {head!r} is a {type(layer).__name__}, not an nn.Linear; pass `head=` naming the "
                f"output Linear (one of {linears})."
            )
        wide = nn.Linear(layer.in_features, 4 * layer.out_features, bias=layer.bias is not None)
        wide = wide.to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():  # gamma keeps the trained (or initial) head; nu, alpha, beta start fresh
            wide.weight[: layer.out_features] = layer.weight
            if layer.bias is not None:
                wide.bias[: layer.out_features] = layer.bias
        if head:
            set_submodule(model, head, wide)
        else:
            model = wide
        self.backbone = model
        self.head = head
        self.num_targets = layer.out_features

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return nig_constrain(self.backbone(*args, **kwargs))

    def extra_repr(self) -> str:
        return f"head={self.head!r}, num_targets={self.num_targets}"


def evidential_head(backbone: nn.Module | str, kind: str = "dirichlet", **kwargs: Any) -> nn.Module:
    """Convert ``backbone``'s head: ``kind="dirichlet"`` -> :class:`DirichletHead`, ``"nig"`` -> :class:`NIGHead`."""
    check_choice("kind", kind, ("dirichlet", "nig"), "Use 'dirichlet' for classification, 'nig' for regression.")
    if kind == "dirichlet":
        return DirichletHead(backbone, **kwargs)
    return NIGHead(backbone, **kwargs)
