"""Bridge networks (Yun et al., 2023, "Traversing Between Modes in Function Space for Fast Ensembling").

Two trained members ``theta_0`` and ``theta_1`` are joined by a low-loss quadratic Bezier curve
(Garipov et al., 2018) ``theta(t) = (1-t)^2 theta_0 + 2t(1-t) theta_b + t^2 theta_1`` whose bend
``theta_b`` is trained by minimising the loss at random points ``t ~ U(0, 1)``. The models on the curve
are good *and* different from the ends, so they are useful ensemble members; instead of running them, a
light **bridge** network reads the base member's intermediate features and predicts the output of the
curve model at ``t``. The ensemble ``base + bridges`` costs one full pass plus the bridges.

* :class:`BezierCurve` / :func:`fit_bezier_curve`: the curve, the model at any ``t``.
* :func:`fit_bridge`: train a bridge on ``(x, curve model at t)``.
* :class:`BridgeEnsemble`: ``(B, ...) -> (1 + K, B, C)``; member 0 is the base, member ``k`` its bridge ``k``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..ensembles.base import Ensemble
from ..ensembles.surgery import set_unregistered

__all__ = ["BezierCurve", "BridgeEnsemble", "default_bridge", "fit_bezier_curve", "fit_bridge"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batches(x: Tensor, y: Tensor | None, batch_size: int, steps: int, generator: torch.Generator):
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(x.device)
        yield x[idx], None if y is None else y[idx]


class BezierCurve(nn.Module):
    """Quadratic Bezier curve between the parameters of two models of the same architecture.

    The ends are fixed buffers; the bend (a parameter per tensor, starting at the midpoint of the
    straight line) is what :func:`fit_bezier_curve` trains. Buffers (e.g. BatchNorm statistics) are
    taken from ``start``; :meth:`model_at` recomputes BatchNorm statistics on data when given.

    Args:
        start: the model at ``t = 0``.
        end: the model at ``t = 1`` (same architecture).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> curve = BezierCurve(a, b)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(curve(x, 0.0), a(x)) and torch.allclose(curve(x, 1.0), b(x))
        True
    """

    _template: nn.Module  # kept out of the module tree (set_unregistered): not a parameter owner of the curve

    def __init__(self, start: nn.Module, end: nn.Module) -> None:
        super().__init__()
        pa, pb = dict(start.named_parameters()), dict(end.named_parameters())
        if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pa):
            raise ValueError(
                "BezierCurve joins two models of the same architecture: their parameter names and shapes differ."
            )
        set_unregistered(self, "_template", copy.deepcopy(start).eval())
        self._names = list(pa)
        self.start = nn.ParameterList([nn.Parameter(pa[k].detach().clone(), requires_grad=False) for k in self._names])
        self.end = nn.ParameterList([nn.Parameter(pb[k].detach().clone(), requires_grad=False) for k in self._names])
        self.bend = nn.ParameterList([nn.Parameter(((pa[k] + pb[k]) / 2).detach().clone()) for k in self._names])

    def parameters_at(self, t: float | Tensor) -> dict[str, Tensor]:
        """``{name: theta(t)}``; differentiable in the bend."""
        t = torch.as_tensor(t, dtype=torch.float32)
        w0, wb, w1 = (1 - t) ** 2, 2 * t * (1 - t), t**2
        return {n: w0 * a + wb * b + w1 * c for n, a, b, c in zip(self._names, self.start, self.bend, self.end)}

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        """Output of the model at curve point ``t`` (template buffers, eval mode)."""
        template = self._template.to(x.device)
        buffers = dict(template.named_buffers())
        return functional_call(template, {**self.parameters_at(t), **buffers}, (x,))

    @torch.no_grad()
    def model_at(self, t: float, x: Tensor | None = None, batch_size: int = 256) -> nn.Module:
        """A standalone model with the parameters at ``t``; BatchNorm statistics recomputed on ``x`` if given."""
        model = copy.deepcopy(self._template)
        for name, value in self.parameters_at(t).items():
            model.get_parameter(name).copy_(value)
        bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
        if bns and x is not None:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the passes below
            model.train()
            for xb in x.split(batch_size):
                model(xb)
        return model.eval()


def fit_bezier_curve(
    start: nn.Module,
    end: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int = 500,
    lr: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
) -> BezierCurve:
    """Train the bend of the curve between ``start`` and ``end``: cross-entropy at ``t ~ U(0, 1)`` per step."""
    curve = BezierCurve(start, end).to(x.device)
    opt = torch.optim.Adam(curve.bend.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for xb, yb in _batches(x, y, batch_size, steps, g):
        t = torch.rand((), generator=g)
        loss = F.cross_entropy(curve(xb, t), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve.eval()


class _Features:
    """Forward hook keeping the output of one submodule."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args, output) -> None:
        self.value = output


def _run_with_features(base: nn.Module, layer: str, x: Tensor) -> tuple[Tensor, Tensor]:
    hook = _Features(base.get_submodule(layer))
    try:
        out = base(x)
    finally:
        hook.handle.remove()
    if not isinstance(hook.value, Tensor):
        raise ValueError(f"feature layer {layer!r} did not run (or returned no tensor) in the base model's forward.")
    return out, hook.value


def default_bridge(features: Tensor, num_classes: int, hidden: int = 64) -> nn.Module:
    """A light bridge for features of the shape of ``features`` ``(B, ...)``: flatten, Linear-ReLU-Linear."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features[0].numel(), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


class _BridgeMember(nn.Module):
    """A standalone bridge member: the base up to its features, then the bridge."""

    def __init__(self, base: nn.Module, feature_layer: str, bridge: nn.Module) -> None:
        super().__init__()
        self.base, self.feature_layer, self.bridge = base, feature_layer, bridge

    def forward(self, x: Tensor) -> Tensor:
        return self.bridge(_run_with_features(self.base, self.feature_layer, x)[1])


class BridgeEnsemble(Ensemble):
    """The base model plus bridge networks on its features: ``(B, ...) -> (1 + K, B, C)``.

    One full pass of ``base`` gives member 0 and the features (output of the submodule named
    ``feature_layer``); bridge ``k`` maps those features to member ``k + 1``'s logits.

    Args:
        base: the trained base model (member 0).
        feature_layer: name of the submodule of ``base`` whose output the bridges take.
        bridges: one network per extra member, features -> logits.

    Example:
        >>> import torch
        >>> from lightning_ensembles import MLP
        >>> base = MLP(8, 3, hidden=(16, 16))
        >>> bridge = torch.nn.Linear(16, 3)
        >>> ens = BridgeEnsemble(base, "net.3", [bridge])   # features after the second ReLU
        >>> ens(torch.randn(5, 8)).shape
        torch.Size([2, 5, 3])
    """

    def __init__(self, base: nn.Module, feature_layer: str, bridges: Sequence[nn.Module]) -> None:
        super().__init__(1 + len(bridges))
        try:
            base.get_submodule(feature_layer)
        except AttributeError as err:
            names = [n for n, _ in base.named_modules() if n]
            raise ValueError(
                f"`feature_layer`={feature_layer!r} is not a submodule of the base model; choose one of {names[:20]}."
            ) from err
        self.base = base
        self.feature_layer = feature_layer
        self.bridges = nn.ModuleList(bridges)

    def forward(self, x: Tensor) -> Tensor:
        out, features = _run_with_features(self.base, self.feature_layer, x)
        return torch.stack([out, *(b(features) for b in self.bridges)])

    def member(self, index: int) -> nn.Module:
        index = self._check_index(index)
        base = copy.deepcopy(self.base)
        if index == 0:
            return base
        return _BridgeMember(base, self.feature_layer, copy.deepcopy(self.bridges[index - 1]))


def fit_bridge(
    base: nn.Module,
    feature_layer: str,
    target: nn.Module,
    x: Tensor,
    bridge: nn.Module | None = None,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Train ``bridge`` (default :func:`default_bridge`) to predict ``target``'s outputs from ``base``'s features.

    ``target`` is typically ``curve.model_at(t)``; the loss is the KL divergence from the target's
    softmax. ``base`` and ``target`` are not changed.
    """
    base, target = base.eval(), target.eval()
    with torch.no_grad():
        out, feats = _run_with_features(base, feature_layer, x[: min(len(x), 2)])
    if bridge is None:
        bridge = default_bridge(feats, out.shape[-1])
    bridge = bridge.to(x.device).train()
    opt = torch.optim.Adam(bridge.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for xb, _ in _batches(x, None, batch_size, steps, g):
        with torch.no_grad():
            feats = _run_with_features(base, feature_layer, xb)[1]
            p = target(xb).softmax(-1)
        log_q = F.log_softmax(bridge(feats), -1)
        loss = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return bridge.eval()
