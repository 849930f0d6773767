"""torch.compile: eager vs compiled training step and inference for one MLP and its ensembles, same run.

    python benchmarks/compile.py                 # MLP 64-256-256-10, batch 128, Adam, 2 threads
    python benchmarks/compile.py --quick         # fewer repetitions
    python benchmarks/compile.py --clock wall    # wall clock instead of process CPU time
    python benchmarks/compile.py --repeat 3      # three timing passes per model: ratios as median [min-max]
    python benchmarks/compile.py --fit           # the same models trained by Lightning (Trainer.fit)

Every model is compiled with ``torch.compile(model)`` (default mode); the loss, backward and Adam step
stay eager, as in a Lightning ``training_step`` calling a compiled model. Timings are interleaved
(every variant in turn, rotating which goes first) and use process CPU time by default, which a
loaded shared machine disturbs less than wall time. Columns:

    train x / infer x   compiled time / eager time (< 1: compile gains), training step / no-grad forward;
                        with --repeat N: the median of N timing passes and [their min-max]
    breaks              graph breaks (torch._dynamo.explain) in training mode and in eval mode
    recompiles          frames compiled during 3 steady-state training steps after the warm-up (want 0)

With ``--fit`` each model trains in ``Trainer.fit`` (ensembles as ``EnsembleClassifier(ensemble=...)``,
the single MLP as a plain LightningModule; compiled in place with ``model.compile()``), 3 epochs of 30
batches without validation; ``train x`` is then the median CPU time of a whole Lightning training batch
(``on_train_batch_start`` to ``on_train_batch_end``) in epochs 2-3, compiled / eager, fits alternating.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import DeepEnsemble, EnsembleClassifier
from lightning_ensembles.ensembles.registry import build_ensemble

try:
    from _timing import parse_with_threads
except ImportError:  # run as a module
    from benchmarks._timing import parse_with_threads


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def models() -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "single MLP": mlp(),
            "DeepEnsemble x8": DeepEnsemble(mlp(), 8),
            "PackedEnsemble x4": build_ensemble("packed", mlp(), num_members=4),
            "BatchEnsemble x4": build_ensemble("batch", mlp(), num_members=4),
            "LoRAEnsemble x4": build_ensemble("lora", mlp(), num_members=4, target_modules=["0", "2", "4"]),
        }


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == 2:  # the single model
        return F.cross_entropy(out, y)
    # (M, B', C): BatchEnsemble/LoRA may split or repeat the batch; every member scores every row it sees
    m, rows = out.shape[:2]
    return F.cross_entropy(out.reshape(m * rows, -1), y.repeat((m * rows) // y.shape[0])[: m * rows])


def train_step(model: nn.Module, run, opt: torch.optim.Optimizer, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(run(x), y).backward()
        opt.step()

    return step


def infer(run, x):
    def call():
        with torch.no_grad():
            run(x)

    return call


def interleaved(fns: dict, reps: int, clock, inner: int = 5) -> dict[str, float]:
    times = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(reps):
        for k, fn in order[r % len(order) :] + order[: r % len(order)]:
            t0 = clock()
            for _ in range(inner):
                fn()
            times[k].append((clock() - t0) / inner)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def med(passes: list[dict[str, float]], key: str) -> float:
    return statistics.median(p[key] for p in passes)


def ratios(passes: list[dict[str, float]]) -> str:
    """compiled / eager: the median over timing passes, and with several passes [min-max]."""
    r = [p["compiled"] / p["eager"] for p in passes]
    text = f"{statistics.median(r):.2f}"
    return text if len(r) == 1 else f"{text} [{min(r):.2f}-{max(r):.2f}]"


def graph_breaks(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    out = []
    for train in (True, False):
        model.train(train)
        torch._dynamo.reset()
        with torch.set_grad_enabled(train):
            out.append(torch._dynamo.explain(model)(x).graph_break_count)
    model.train()
    return out[0], out[1]


class _SingleClassifier(L.LightningModule):
    """The single MLP as a user's plain LightningModule (cross-entropy, Adam)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _StepTimer(L.Callback):
    """CPU time of each training batch after the first epoch (compilation and warm-up happen there)."""

    def __init__(self, clock) -> None:
        self.clock, self.times, self._t0 = clock, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch >= 1:
            self.times.append(self.clock() - self._t0)


def fit_step_ms(name: str, compiled: bool, clock) -> float:
    """Median ms of a steady-state Lightning training batch of model ``name``, eager or compiled in place."""
    torch.manual_seed(0)
    model = models()[name]
    module = _SingleClassifier(model) if name == "single MLP" else EnsembleClassifier(ensemble=model, lr=1e-3)
    if compiled:
        torch._dynamo.reset()
        model.compile()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128 * 30, 64, generator=g), torch.randint(0, 10, (128 * 30,), generator=g))
    timer = _StepTimer(clock)
    quiet = dict.fromkeys(("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"), False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_val_batches=0, callbacks=[timer], **quiet)
    trainer.fit(module, DataLoader(data, batch_size=128, shuffle=True, generator=g))
    return 1e3 * statistics.median(timer.times)


def fit_table(args, clock) -> None:
    print(f"Lightning fit: median training batch (ms), epochs 2-3 of 3 x 30 batches; {args.repeat} alternating pairs")
    print(f"{'model':<20} {'train ms eager':>14} {'compiled':>9} {'train x':>18}")
    for name in models():
        if args.only and not any(s in name for s in args.only):
            continue
        passes = []
        for _ in range(args.repeat):
            passes.append({"eager": fit_step_ms(name, False, clock), "compiled": fit_step_ms(name, True, clock)})
        print(
            f"{name:<20} {med(passes, 'eager'):>14.2f} {med(passes, 'compiled'):>9.2f} {ratios(passes):>18}", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--only", nargs="*", help="substrings of model names to run")
    parser.add_argument("--repeat", type=int, default=1, help="timing passes per model (the spread is printed)")
    parser.add_argument("--fit", action="store_true", help="time training inside Lightning's Trainer.fit")
    args = parse_with_threads(parser, default=2)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    reps = 7 if args.quick else 21
    width = 8 if args.repeat == 1 else 18
    if args.fit:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        print(f"torch {torch.__version__}, {args.threads} threads, batch 128, Adam, {args.clock} clock")
        return fit_table(args, clock)
    torch.manual_seed(0)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    print(f"torch {torch.__version__}, {args.threads} threads, batch 128, Adam, {args.clock} clock, {reps} rounds")
    print(
        f"{'model':<20} {'train ms eager':>14} {'compiled':>9} {'train x':>{width}} {'infer ms eager':>15} "
        f"{'compiled':>9} {'infer x':>{width}} {'breaks':>7} {'recompiles':>10}"
    )
    for name, model in models().items():
        if args.only and not any(s in name for s in args.only):
            continue
        breaks = graph_breaks(model, x)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        eager_step, compiled_step = train_step(model, model, opt, x, y), train_step(model, compiled, opt, x, y)
        for _ in range(3):  # compile and warm up
            compiled_step()
            eager_step()
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        for _ in range(3):
            compiled_step()
        recompiles = torch._dynamo.utils.counters["frames"]["ok"] - frames
        train = [interleaved({"eager": eager_step, "compiled": compiled_step}, reps, clock) for _ in range(args.repeat)]
        model.eval()
        eager_inf, compiled_inf = infer(model, x), infer(compiled, x)
        for _ in range(3):
            compiled_inf()
            eager_inf()
        inf = [interleaved({"eager": eager_inf, "compiled": compiled_inf}, reps, clock) for _ in range(args.repeat)]
        print(
            f"{name:<20} {med(train, 'eager'):>14.2f} {med(train, 'compiled'):>9.2f} {ratios(train):>{width}} "
            f"{med(inf, 'eager'):>15.2f} {med(inf, 'compiled'):>9.2f} {ratios(inf):>{width}} "
            f"{'%d/%d' % breaks:>7} {recompiles:>10}",
            flush=True,
        )


if __name__ == "__main__":
    main()
