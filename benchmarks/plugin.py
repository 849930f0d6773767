"""Epoch time of the plug-in route (an unchanged LightningModule + the Ensembling callback) against
EnsembleClassifier, for the same 4-member deep ensemble of the same MLP on digits, in one run.

    python benchmarks/plugin.py [--epochs 5] [--repeats 3] [--threads 2]

Target: the callback route within 5% of EnsembleClassifier. ``batch="repeat"`` runs the user's
training_step once per member (the ensemble once); ``batch="split"`` runs it once with every member on
every sample, so the two rows differ by the cost of the extra passes (and split's smaller loss).
Routes are interleaved and each reports its fastest epoch (after the first), which a busy machine
disturbs least.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_ensembles import DeepEnsemble, EnsembleClassifier
from lightning_ensembles.callbacks import Ensembling
from lightning_ensembles.data import DigitsDataModule

try:
    from _timing import parse_with_threads
except ImportError:  # run as a module
    from benchmarks._timing import parse_with_threads


def backbone() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


class UserClassifier(L.LightningModule):
    """A plain classifier as in Lightning's docs; it knows nothing about ensembles."""

    def __init__(self) -> None:
        super().__init__()
        self.model = backbone()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t)


def run(route: str, epochs: int) -> float:
    L.seed_everything(0)
    timer = EpochTimer()
    callbacks: list[Callback] = [timer]
    if route.startswith("callback"):
        module: L.LightningModule = UserClassifier()
        callbacks.insert(0, Ensembling(num_members=4, batch="split" if route.endswith("split") else "repeat"))
    else:
        module = EnsembleClassifier(DeepEnsemble(backbone(), num_members=4), lr=1e-3)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, DigitsDataModule(batch_size=64))
    return min(timer.times[1:] or timer.times)


def step_times(rounds: int, block: int = 20) -> dict[str, float]:
    """Fastest time of one training step (the callback's training_step, backward, Adam) per batch mode.

    Without a Trainer, so only what the two modes do differently is timed: ``"repeat"`` runs the user's
    training_step once per member, ``"split"`` once.
    """
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    steps = {}
    for mode in ("repeat", "split"):
        torch.manual_seed(0)
        module, callback = UserClassifier(), Ensembling(num_members=4, batch=mode)
        callback.apply(module)
        if mode == "repeat":
            callback._patch_training_step(module)
        module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

        def step(module=module, optimizer=optimizer) -> None:
            loss = module.training_step((x, y), 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        for _ in range(block):  # warm-up
            step()
        steps[mode] = step
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):  # interleaved blocks, fastest kept
        for mode, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(block):
                step()
            best[mode] = min(best[mode], (time.perf_counter() - t0) / block)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_with_threads(parser, default=2)
    times: dict[str, list[float]] = {"EnsembleClassifier": [], "callback": [], "callback split": []}
    for _ in range(args.repeats):  # interleaved so that machine noise hits every route alike
        for route in times:
            times[route].append(run(route, args.epochs))
    best = {route: min(t) for route, t in times.items()}
    base = best["EnsembleClassifier"]
    names = {
        "EnsembleClassifier": "EnsembleClassifier",
        "callback": "unchanged LightningModule + Ensembling callback (batch='repeat')",
        "callback split": "unchanged LightningModule + Ensembling callback (batch='split')",
    }
    print("\n| route (4-member deep ensemble, MLP 64-256-256-10, digits, batch 64) | epoch time (ms) | ratio |")
    print("|---|---|---|")
    for route, t in best.items():
        print(f"| {names[route]} | {t * 1e3:.1f} | {t / base:.3f} |")
    steps = step_times(rounds=10 * args.repeats)
    print("\n| Ensembling batch mode (same model, batch 64, no Trainer) | training step (ms) | ratio |")
    print("|---|---|---|")
    for mode, t in steps.items():
        print(f"| {mode} | {t * 1e3:.2f} | {t / steps['split']:.3f} |")


if __name__ == "__main__":
    main()
