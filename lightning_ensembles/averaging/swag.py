"""SWAG (Maddox et al., 2019): a Gaussian over weights from SWA's first and second moments plus a low-rank part."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..ensembles.base import Ensemble
from ._named import member_groups
from .base import WeightAverager
from .bn import has_batchnorm, update_bn
from .swa import SWA

__all__ = ["SWAG", "SWAGEnsemble"]


class SWAG(WeightAverager):
    """Running mean, second moment and the last ``max_rank`` deviations of weight snapshots.

    The posterior is ``N(mean, scale * (diag(var) + D D^T / (K - 1)))`` with ``var = E[w^2] - mean^2``
    (clamped at ``var_clamp``) and ``D`` the last ``K <= max_rank`` deviations ``w_i - mean_i`` (each
    taken right after ``mean_i`` includes ``w_i``, as in the official code). ``scale=0.5`` is the
    paper's ``1/2 (Sigma_diag + Sigma_low-rank)``.

    Per member: tensors of a :class:`~lightning_ensembles.DeepEnsemble` carry the member axis first
    (or, with ``storage="per_member"``, belong to one member), and each member draws its own low-rank noise, so a deep ensemble becomes MultiSWAG (one SWAG
    posterior per member). Tensors outside such an ensemble share one joint low-rank draw.

    Args:
        max_rank: ``K``, the most deviations kept for the low-rank part of the covariance.
        var_clamp: smallest diagonal variance.
        scale: multiplier of the covariance when sampling (``0.5`` is the paper's).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net, swag = nn.Linear(3, 1), SWAG(max_rank=5)
        >>> for _ in range(4):
        ...     _ = net.weight.data.add_(torch.randn(1, 3))
        ...     swag.update(net)
        >>> samples = swag.sample(num_samples=2, generator=torch.Generator().manual_seed(0))
        >>> len(samples), samples[0]["weight"].shape
        (2, torch.Size([1, 3]))
    """

    def __init__(self, max_rank: int = 20, var_clamp: float = 1e-6, scale: float = 0.5) -> None:
        if max_rank < 0:
            raise ValueError(f"`max_rank` must be >= 0 (0 = diagonal SWAG), got {max_rank}.")
        if var_clamp < 0 or scale < 0:
            raise ValueError(f"`var_clamp` and `scale` must be >= 0, got {var_clamp} and {scale}.")
        super().__init__(average_buffers=False)
        self.max_rank = max_rank
        self.var_clamp = var_clamp
        self.scale = scale
        self.sq_mean: dict[str, Tensor] = {}
        self.deviations: dict[str, Tensor] = {}  # name -> (max_rank, *shape) ring buffer
        self.groups: dict[str, tuple[str, bool]] = {}
        self._swa = SWA()

    # The mean is exactly SWA's; the second moment is SWA's update applied to squared weights.
    def update(self, module: nn.Module) -> None:  # noqa: D102 - documented on the base class
        if self.n_averaged == 0:
            self.groups = member_groups(module)
        super().update(module)

    def _first(self, current: dict[str, Tensor]) -> None:
        self.sq_mean = {n: t.square() for n, t in current.items()}
        self.deviations = {n: t.new_zeros((self.max_rank, *t.shape)) for n, t in current.items()}
        self._record_deviation(current)

    def _combine(self, averaged: list[Tensor], current: list[Tensor]) -> None:
        self._swa.n_averaged = self.n_averaged
        self._swa._combine(averaged, current)
        names = list(self.average)
        self._swa._combine([self.sq_mean[n] for n in names], [c.square() for c in current])

    def _after(self, current: dict[str, Tensor]) -> None:
        self._record_deviation(current)

    def _record_deviation(self, current: dict[str, Tensor]) -> None:
        if self.max_rank == 0:
            return
        slot = self.n_averaged % self.max_rank  # n_averaged is incremented after this hook
        for n, t in current.items():
            self.deviations[n][slot] = t.to(self.average[n].device) - self.average[n]

    # ------------------------------------------------------------------ the posterior
    @property
    def rank(self) -> int:
        """Number of deviation columns collected so far (at most ``max_rank``)."""
        return min(self.n_averaged, self.max_rank)

    def variance(self) -> dict[str, Tensor]:
        """Diagonal variance ``max(E[w^2] - mean^2, var_clamp)`` per tensor."""
        return {n: (self.sq_mean[n] - m.square()).clamp_min(self.var_clamp) for n, m in self.average.items()}

    def _lowrank_deviations(self) -> dict[str, Tensor]:
        # the ring buffer's first `rank` slots hold the last `rank` deviations (order irrelevant)
        return {n: d[: self.rank] for n, d in self.deviations.items()}

    def marginal_variance(self) -> dict[str, Tensor]:
        """Per-weight variance of a draw: ``scale * (var + sum_k D_k^2 / (K - 1))``."""
        var = self.variance()
        if self.rank >= 2:
            for n, d in self._lowrank_deviations().items():
                var[n] = var[n] + d.square().sum(0) / (self.rank - 1)
        return {n: self.scale * v for n, v in var.items()}

    @torch.no_grad()
    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None) -> list[dict[str, Tensor]]:
        """Draw ``num_samples`` weight sets ``{name: tensor}`` from the SWAG posterior."""
        if self.n_averaged == 0:
            raise ValueError("SWAG has no snapshots yet; call `update(model)` during training before sampling.")
        var_sqrt = {n: v.sqrt() for n, v in self.variance().items()}
        devs = self._lowrank_deviations()
        use_lowrank = self.rank >= 2
        out = []
        for _ in range(num_samples):
            z2: dict[str | tuple[str, int], Tensor] = {}  # one low-rank draw per group: per member, or joint
            sample = {}
            for n, mean in self.average.items():
                noise = var_sqrt[n] * torch.randn(mean.shape, generator=generator, device="cpu").to(mean)
                if use_lowrank:
                    group, member_axis = self.groups.get(n, ("", False))
                    if member_axis:  # member axis first: each member gets its own K coefficients
                        key = (group, mean.shape[0])
                        if key not in z2:
                            z2[key] = torch.randn(self.rank, mean.shape[0], generator=generator).to(mean)
                        coef = z2[key].reshape(self.rank, mean.shape[0], *([1] * (mean.dim() - 1)))
                    else:  # one member's own tensor, or outside any DeepEnsemble ("": one joint draw)
                        if group not in z2:
                            z2[group] = torch.randn(self.rank, generator=generator).to(mean)
                        coef = z2[group].reshape(self.rank, *([1] * mean.dim()))
                    noise = noise + (devs[n] * coef).sum(0) / math.sqrt(self.rank - 1)
                sample[n] = mean + math.sqrt(self.scale) * noise
            out.append(sample)
        return out

    def sample_ensemble(
        self,
        module: nn.Module,
        num_samples: int = 30,
        loader: Iterable[Any] | None = None,
        seed: int = 0,
    ) -> "SWAGEnsemble":
        """An :class:`SWAGEnsemble` of ``num_samples`` draws of ``module``'s weights.

        With ``loader``, BatchNorm statistics are recomputed for every draw (per member), as in the
        paper; without it, draws keep ``module``'s buffers.
        """
        gen = torch.Generator().manual_seed(seed)
        return SWAGEnsemble(module, self.sample(num_samples, gen), loader=loader)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            sq_mean=dict(self.sq_mean),
            deviations=dict(self.deviations),
            groups=dict(self.groups),
            max_rank=self.max_rank,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["max_rank"]) != self.max_rank:
            raise ValueError(f"checkpoint has SWAG max_rank={state['max_rank']}, this SWAG has {self.max_rank}.")
        super().load_state_dict(state)
        self.sq_mean = {n: t.clone() for n, t in state["sq_mean"].items()}
        self.deviations = {n: t.clone() for n, t in state["deviations"].items()}
        self.groups = {n: tuple(g) for n, g in state["groups"].items()}

    def to(self, device: torch.device | str) -> "SWAG":
        super().to(device)
        self.sq_mean = {n: t.to(device) for n, t in self.sq_mean.items()}
        self.deviations = {n: t.to(device) for n, t in self.deviations.items()}
        return self


class SWAGEnsemble(Ensemble):
    """An ensemble of weight sets drawn from a SWAG posterior, all run through one model.

    ``forward(x)`` runs ``module`` once per draw. If ``module`` is itself an :class:`Ensemble`
    with M members the outputs are concatenated to ``(N * M, B, ...)`` (MultiSWAG: N draws of each
    member); otherwise they are stacked to ``(N, B, ...)``.

    Args:
        module: the model (or ensemble) the sampled weights are loaded into.
        samples: the sampled weight sets, one state dict each (e.g. from ``SWAG.sample``).
        loader: training batches to recompute BatchNorm statistics for every sample (``None``: keep the module's).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net, swag = nn.Linear(3, 2), SWAG()
        >>> swag.update(net); swag.update(net)
        >>> SWAGEnsemble(net, swag.sample(4))(torch.randn(5, 3)).shape
        torch.Size([4, 5, 2])
    """

    def __init__(
        self, module: nn.Module, samples: list[dict[str, Tensor]], loader: Iterable[Any] | None = None
    ) -> None:
        if not samples:
            raise ValueError("`samples` is empty; draw at least one weight set with `SWAG.sample(n)`.")
        inner = module.num_members if isinstance(module, Ensemble) else 1
        super().__init__(len(samples) * inner)
        self.num_samples = len(samples)
        self.inner_members = inner
        self.module = copy.deepcopy(module)
        # Each draw is a full state (parameters + buffers) so that per-draw BN statistics are kept.
        base = {n: t.detach() for n, t in self.module.state_dict(keep_vars=True).items()}
        self.states: list[dict[str, Tensor]] = []
        for s in samples:
            state = {n: t.clone() for n, t in base.items()}
            state.update({n: t.detach().clone() for n, t in s.items()})
            self.states.append(state)
        if loader is not None and has_batchnorm(self.module):
            for state in self.states:
                self.module.load_state_dict(state)
                update_bn(loader, self.module)
                state.update({n: t.detach().clone() for n, t in self.module.named_buffers() if n in state})

    def forward(self, x: Tensor) -> Tensor:
        """Outputs of every draw, ``(N * M, B, ...)`` (``(N, B, ...)`` for a plain model)."""
        outs = [functional_call(self.module, s, (x,)) for s in self.states]
        return torch.cat(outs) if self.inner_members > 1 or isinstance(self.module, Ensemble) else torch.stack(outs)

    def member(self, index: int) -> nn.Module:
        """Draw ``index // M`` of member ``index % M`` as a standalone module."""
        index = self._check_index(index)
        draw, inner = divmod(index, self.inner_members)
        module = copy.deepcopy(self.module)
        module.load_state_dict(self.states[draw])
        return module.member(inner) if isinstance(module, Ensemble) else module
