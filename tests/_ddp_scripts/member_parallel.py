"""Member-parallel (2 processes, M = 4) against one process with the same seed, same data order.

Usage: python member_parallel.py OUT_DIR. The launching process first trains the single-process
reference, then both ranks train member-parallel; every process writes ``OUT_DIR/<name>.pt``.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
import torch.distributed as dist
from common import SmallDigits, floats, is_launcher, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.callbacks.weight_averaging import MemberWeightAveraging
from lightning_ensembles.strategies import MemberParallelStrategy, MemberShard

M, SEED = 4, 0


def build() -> EnsembleClassifier:
    """Per-member storage (ranks train stacked shards and gather back into it); vmap as in the shards."""
    L.seed_everything(SEED, verbose=False)
    return EnsembleClassifier(
        backbone="mlp",
        num_members=M,
        backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)},
        lr=1e-2,
        ensemble_kwargs={"storage": "per_member", "execution": "vmap"},
    )


def build_bn_swa() -> tuple[EnsembleClassifier, MemberWeightAveraging]:
    """Members with BatchNorm (stacked storage), averaged by SWA (BatchNorm recomputed on the training data at the end)."""
    L.seed_everything(SEED, verbose=False)
    backbone = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model = EnsembleClassifier(backbone=backbone, num_members=M, lr=1e-2)
    return model, MemberWeightAveraging("swa", attribute="ensemble", start_epoch=1)


def snapshot(model: EnsembleClassifier) -> dict[str, torch.Tensor]:
    ens = model.ensemble
    return {k: v.detach().clone() for k, v in {**ens.stacked_parameters(), **ens.stacked_buffers()}.items()}


class NoGradientSync(Callback):
    """Checks that nothing touches gradients between backward and the optimiser step, and counts the
    reducing collectives issued during training batches (there must be none)."""

    REDUCING = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced")

    def __init__(self) -> None:
        self.autograd: dict[int, torch.Tensor] = {}
        self.calls = {"reducing": 0, "all_gather": 0}
        self.checked = 0
        self.mismatch = 0
        self._in_batch = False
        for name in self.REDUCING + ("all_gather",):
            if hasattr(dist, name):
                self._wrap(name)

    def _wrap(self, name: str) -> None:
        original = getattr(dist, name)
        key = "all_gather" if name == "all_gather" else "reducing"

        def counted(*args, **kwargs):
            if self._in_batch:
                self.calls[key] += 1
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def on_train_start(self, trainer, pl_module) -> None:
        assert isinstance(pl_module.ensemble, MemberShard), type(pl_module.ensemble)
        assert not isinstance(trainer.strategy.model, DistributedDataParallel)
        for p in pl_module.parameters():
            p.register_hook(lambda g, p=p: self.autograd.__setitem__(id(p), g.detach().clone()))

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_replicas = trainer.val_dataloaders.sampler.num_replicas  # evaluation data are split

    def on_train_batch_start(self, *args) -> None:
        self._in_batch = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            self.checked += 1
            self.mismatch += int(not torch.equal(p.grad, self.autograd[id(p)]))

    def on_train_batch_end(self, *args) -> None:
        self._in_batch = False


def main(out: str) -> None:
    dm = SmallDigits(replicated_train=True)
    if is_launcher():  # single-process reference (rank 1 is launched later and skips this)
        model = build()
        t = trainer()
        t.fit(model, dm)
        val = floats(t.callback_metrics)
        t.test(model, dm, verbose=False)
        reference = {"params": snapshot(model), "val": val, "test": floats(t.callback_metrics)}
        model, swa = build_bn_swa()
        trainer(callbacks=[swa]).fit(model, dm)
        reference["swa_params"] = snapshot(model)
        torch.save(reference, f"{out}/single.pt")

    model = build()
    check = NoGradientSync()
    ckpt = ModelCheckpoint(
        dirpath=out, filename="epoch{epoch}", save_top_k=-1, save_last=True, auto_insert_metric_name=False
    )
    t = trainer(devices=2, strategy=MemberParallelStrategy(), callbacks=[check, ckpt], enable_checkpointing=True)
    t.fit(model, dm)
    assert model.ensemble.storage == "per_member", model.ensemble  # gathered back into the full layout
    val = floats(t.callback_metrics)
    t.test(model, dm, verbose=False)
    result = {
        "params": snapshot(model),
        "val": val,
        "test": floats(t.callback_metrics),
        "calls": check.calls,
        "checked": check.checked,
        "mismatch": check.mismatch,
        "wrapped": type(t.strategy.model).__name__,
        "val_replicas": check.val_replicas,
    }
    # Resume from the end of epoch 0 (full checkpoint: members and Adam state are sliced per rank).
    model = build()
    t = trainer(devices=2, strategy=MemberParallelStrategy())
    t.fit(model, dm, ckpt_path=f"{out}/epoch0.ckpt")
    result["resumed_params"] = snapshot(model)
    model, swa = build_bn_swa()
    trainer(devices=2, strategy=MemberParallelStrategy(), callbacks=[swa]).fit(model, dm)
    result["swa_params"] = snapshot(model)
    torch.save(result, f"{out}/rank{t.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
