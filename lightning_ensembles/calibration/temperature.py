"""Temperature scaling (Guo et al., 2017): one scalar ``T`` dividing the logits, fitted by minimising NLL."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics._checks import check_finite, check_targets

#: What the tensor handed to the scaler holds: ``(B, C)`` logits, ``(M, B, C)`` member logits or ``(B, C)`` probabilities.
Kind = Literal["logits", "member_logits", "probs"]


def _check(x: Tensor, kind: str) -> None:
    if kind not in ("logits", "member_logits", "probs"):
        raise ValueError(f"`kind` must be 'logits', 'member_logits' or 'probs', got {kind!r}.")
    want = 3 if kind == "member_logits" else 2
    if x.dim() != want:
        shape = "(M, B, C)" if want == 3 else "(B, C)"
        raise ValueError(f"{kind} must have shape {shape}, got {tuple(x.shape)}.")
    check_finite(x, kind)


def scaled_log_probs(x: Tensor, temperature: Tensor | float, kind: Kind = "logits") -> Tensor:
    """Log-probabilities ``(B, C)`` after temperature scaling.

    - ``logits``: ``log_softmax(z / T)``;
    - ``member_logits``: log of ``mean_m softmax(z_m / T)`` (every member scaled by the same ``T``,
      then averaged: the same thing as dividing the ensemble's forward output by ``T``);
    - ``probs``: ``log_softmax(log p / T)`` (``p ** (1/T)`` renormalised).
    """
    _check(x, kind)
    if kind == "probs":
        x = x.clamp_min(1e-12).log()
    scaled = F.log_softmax(x / temperature, dim=-1)
    if kind == "member_logits":
        return torch.logsumexp(scaled, dim=0) - math.log(x.shape[0])
    return scaled


def fit_temperature(
    x: Tensor, target: Tensor, kind: Kind = "logits", init: float = 1.5, max_iter: int = 100
) -> float:
    """Temperature ``T > 0`` minimising the mean NLL of ``scaled_log_probs(x, T, kind)`` on ``target``.

    Optimises ``log T`` (so ``T`` stays positive) with L-BFGS and a strong-Wolfe line search: unlike
    Guo et al.'s fixed ``lr=0.01`` it converges from ``init`` to a far-away optimum (e.g. ``T = 5``)
    in a handful of steps. Runs in float64 on detached inputs.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(4000, 5, generator=g) * 2
        >>> target = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
        >>> round(fit_temperature(logits * 5, target), 1)  # logits 5x too sharp -> T close to 5
        5.0
    """
    _check(x, kind)
    batch = x.shape[1] if kind == "member_logits" else x.shape[0]
    check_targets(target, batch, x.shape[-1])
    if init <= 0:
        raise ValueError(f"`init` temperature must be > 0, got {init}.")
    x = x.detach().double()
    target = target.detach().to(x.device)
    log_t = torch.tensor(math.log(init), dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.nll_loss(scaled_log_probs(x, log_t.exp(), kind), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


class TemperatureScaler(nn.Module):
    """A fitted temperature as a module: ``fit(x, target)`` then ``scaler(x)`` gives calibrated log-probs.

    ``temperature`` is a buffer, so it travels with ``state_dict`` and checkpoints.

    Example:
        >>> import torch
        >>> scaler = TemperatureScaler(kind="logits")
        >>> logits, target = torch.randn(200, 3), torch.randint(0, 3, (200,))
        >>> _ = scaler.fit(logits, target)
        >>> scaler(logits).exp().sum(-1).allclose(torch.ones(200))
        True
    """

    temperature: Tensor

    def __init__(self, kind: Kind = "logits", init: float = 1.5, max_iter: int = 100) -> None:
        super().__init__()
        if kind not in ("logits", "member_logits", "probs"):
            raise ValueError(f"`kind` must be 'logits', 'member_logits' or 'probs', got {kind!r}.")
        self.kind = kind
        self.init = init
        self.max_iter = max_iter
        self.register_buffer("temperature", torch.tensor(1.0))

    def fit(self, x: Tensor, target: Tensor) -> TemperatureScaler:
        self.temperature.fill_(fit_temperature(x, target, self.kind, self.init, self.max_iter))
        return self

    def forward(self, x: Tensor) -> Tensor:
        return scaled_log_probs(x, self.temperature.to(x.dtype), self.kind)
