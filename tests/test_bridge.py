"""Bridge networks: Bezier curve between two members, bridges on the base's features, counted cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles import MLP
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.inference import count_macs
from lightning_ensembles.inference.bridge import BezierCurve, BridgeEnsemble, fit_bezier_curve, fit_bridge


def _digits():
    parts = DigitsDataModule().build()
    return parts["train"], parts["test"]


def _train(seed: int, x, y, steps: int = 400) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(64, 10, hidden=(32, 32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def members():
    (x, y), test = _digits()
    return _train(1, x, y), _train(2, x, y), (x, y), test


def test_curve_ends_and_midpoint_loss_below_linear_path(members):
    a, b, (x, y), (xt, yt) = members
    curve = fit_bezier_curve(a, b, x, y, steps=300, lr=1e-2)
    with torch.no_grad():
        torch.testing.assert_close(curve(xt, 0.0), a(xt))
        torch.testing.assert_close(curve(xt, 1.0), b(xt))
        linear = BezierCurve(a, b)  # bend at the midpoint of the segment: the straight line
        linear_mid = F.cross_entropy(linear(xt, 0.5), yt)
        curve_mid = F.cross_entropy(curve(xt, 0.5), yt)
        end_loss = max(F.cross_entropy(a(xt), yt), F.cross_entropy(b(xt), yt))
    assert curve_mid < linear_mid
    assert curve_mid < 2 * end_loss  # a low-loss path, not just a lower one
    # model_at(t) is a standalone model computing the curve point.
    torch.testing.assert_close(curve.model_at(0.3)(xt), curve(xt, 0.3))


def test_bridge_ensemble_shape_members_and_quality(members):
    a, b, (x, y), (xt, yt) = members
    curve = fit_bezier_curve(a, b, x, y, steps=200)
    target = curve.model_at(0.5)
    bridge = fit_bridge(a, "net.3", target, x, steps=400)  # features after the first hidden ReLU
    ens = BridgeEnsemble(a, "net.3", [bridge])
    with torch.no_grad():
        out = ens(xt)
        assert out.shape == (2, len(yt), 10)
        torch.testing.assert_close(out[0], a(xt))
        torch.testing.assert_close(ens.member(1)(xt), out[1])
        # The bridge predicts the curve model: it agrees with it far more often than chance.
        agree = (out[1].argmax(-1) == target(xt).argmax(-1)).double().mean()
    assert agree > 0.8


def test_bridge_cost_is_one_base_pass_plus_bridges():
    base = MLP(64, 10, hidden=(32, 32))
    bridges = [nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 10)) for _ in range(2)]
    ens = BridgeEnsemble(base, "net.2", bridges)
    x = torch.randn(5, 64)
    base_macs = 64 * 32 + 32 * 32 + 32 * 10
    bridge_macs = 32 * 8 + 8 * 10
    assert count_macs(ens, x) == 5 * (base_macs + 2 * bridge_macs)
    assert count_macs(ens, x) < count_macs(base, x) * 2  # cheaper than a second member


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="not a submodule"):
        BridgeEnsemble(MLP(4, 2), "nope", [])
    with pytest.raises(ValueError, match="same architecture"):
        BezierCurve(MLP(4, 2, hidden=(3,)), MLP(4, 2, hidden=(5,)))
