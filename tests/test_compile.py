"""torch.compile of the ensembles: no graph breaks, no recompiles in steady-state training.

Speed is measured by benchmarks/compile.py, not asserted here.
"""

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

from lightning_ensembles import DeepEnsemble, EnsembleClassifier
from lightning_ensembles.data import DigitsDataModule
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


def _saved_dtypes_backend(saved: list[torch.dtype]):
    """AOTAutograd with inductor's decompositions and partitioner, no codegen: records what the forward saves."""

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        saved.extend(a.meta["val"].dtype for a in out.args[0] if isinstance(a, torch.fx.Node))
        return gm

    return aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda gm, example_inputs: gm,
        partition_fn=min_cut_rematerialization_partition,
        decompositions=select_decomp_table(),
    )


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_saves_no_bool_masks(method):
    """The forward saves activations for the backward, not ReLU masks as bool tensors: inductor's CPU
    kernels write those element by element, which made compiled ensembles train slower than eager."""
    ens = _build(method)
    saved: list[torch.dtype] = []
    out = torch.compile(ens, backend=_saved_dtypes_backend(saved))(torch.randn(6, 8))
    out.sum().backward()
    assert saved and torch.bool not in saved, saved


class _CompileCounters(L.Callback):
    """Training losses, and dynamo's compiled-frame count at the start of every epoch and at the end."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.frames: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.frames.append(torch._dynamo.utils.counters["frames"]["ok"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module):
        self.frames.append(torch._dynamo.utils.counters["frames"]["ok"])


@pytest.mark.parametrize("method", METHODS)
def test_compiled_ensemble_trains_in_lightning_fit(method):
    """An EnsembleClassifier whose ensemble is compiled in place (``ensemble.compile()``) trains in a fit:
    the loss goes down, no graph breaks, and after the first epoch (training, validation and the smaller
    last batch all seen) nothing is compiled again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        kw = dict(target_modules=["1", "3"]) if method == "lora" else {}
        ensemble = build_ensemble(method, backbone, num_members=3, **kw)
    model = EnsembleClassifier(ensemble=ensemble, lr=1e-2)
    ensemble.compile(backend="eager")  # in place: parameter names and state-dict keys unchanged
    counters = _CompileCounters()
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=6, limit_val_batches=2, callbacks=[counters])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0, dict(
        torch._dynamo.utils.counters["graph_break"]
    )
    assert counters.frames[0] < counters.frames[1] == counters.frames[-1]  # compiled in epoch 1 only
    losses = counters.losses
    assert sum(losses[-6:]) < 0.9 * sum(losses[:6])
