"""torch.compile of the ensembles: no graph breaks, no recompiles in steady-state training.

Speed is measured by benchmarks/compile.py, not asserted here.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles import DeepEnsemble
from lightning_ensembles.ensembles.registry import build_ensemble


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _build(method: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "deep":
            return DeepEnsemble(_mlp(), 3)
        kw = dict(target_modules=["0", "2", "4"]) if method == "lora" else {}
        return build_ensemble(method, _mlp(), num_members=3, **kw)


METHODS = ["deep", "packed", "batch", "lora"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("train", [True, False])
def test_no_graph_breaks(method, train):
    ens = _build(method).train(train)
    x = torch.randn(6, 8)
    with torch.set_grad_enabled(train):
        explained = torch._dynamo.explain(ens)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_matches_eager_without_recompiles(method):
    ens = _build(method)
    twin = _build(method)
    twin.load_state_dict(ens.state_dict())
    compiled = torch.compile(ens, backend="eager")  # dynamo only: graph breaks and guards, no codegen
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ens, twin)]
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))

    def step(run, opt):
        opt.zero_grad()
        out = run(x)
        loss = F.cross_entropy(out.reshape(-1, 3), y.repeat(out.numel() // (3 * y.numel())))
        loss.backward()
        opt.step()
        return loss.detach()

    step(compiled, opts[0])  # first compile
    step(twin, opts[1])
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            got, want = step(compiled, opts[0]), step(twin, opts[1])
            assert torch.allclose(got, want, atol=1e-5)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames  # steady state: nothing compiled again
    ens.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), twin(x), atol=1e-5)
