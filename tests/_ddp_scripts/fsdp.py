"""FSDP2 (``ModelParallelStrategy``, data-parallel size 2, gloo on CPU) against DDP on the same data.

Usage: python fsdp.py OUT_DIR. Both strategies train the same seeded DeepEnsemble on the same
split batches; each rank writes ``OUT_DIR/rank<r>.pt`` with both runs' full parameters and metrics.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from common import SmallDigits, floats, trainer
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.strategies import fully_shard_ensembles


class ShardedClassifier(EnsembleClassifier):
    def configure_model(self) -> None:
        self.sharded = fully_shard_ensembles(self, mesh=self.device_mesh["data_parallel"])


def build(cls):
    L.seed_everything(0, verbose=False)
    return cls(
        backbone="mlp", num_members=4, lr=1e-2, backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)}
    )


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.ensemble.stacked_parameters().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v  # DTensor under FSDP2: collective
        out[k] = v.detach().clone()
    return out


def main_gpu(out: str) -> None:
    """Lightning's ``strategy="fsdp"`` (GPU only) on every visible GPU against one GPU without FSDP."""
    from common import is_launcher

    dm = SmallDigits(replicated_train=False)
    devices = torch.cuda.device_count()
    result = {}
    if is_launcher():
        model = build(EnsembleClassifier)
        t = trainer(accelerator="gpu", devices=1, max_epochs=1)
        t.fit(model, dm)
        result["single"] = {"params": full_params(model), "val": floats(t.callback_metrics)}
    model = build(EnsembleClassifier)
    t = trainer(accelerator="gpu", devices=devices, strategy="fsdp", max_epochs=1)
    t.fit(model, dm)
    with torch.no_grad():  # gather FSDP1 flat parameters into the full module
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(t.strategy.model):
            params = full_params(model)
    result["fsdp"] = {"params": params, "val": floats(t.callback_metrics), "devices": devices}
    torch.save(result, f"{out}/gpu_rank{t.global_rank}.pt")


def main(out: str) -> None:
    dm = SmallDigits(replicated_train=False)
    result = {}
    for name, cls, strategy in (
        ("ddp", EnsembleClassifier, "ddp"),
        ("fsdp", ShardedClassifier, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)),
    ):
        model = build(cls)
        t = trainer(devices=2, strategy=strategy)
        t.fit(model, dm)
        if name == "fsdp":
            model.ensemble.reshard()  # FSDP2 keeps the root unsharded after its last forward
        local = (
            {k: v.to_local().shape for k, v in model.ensemble.stacked_parameters().items()} if name == "fsdp" else None
        )
        result[name] = {"params": full_params(model), "val": floats(t.callback_metrics), "local_shapes": local}
    torch.save(result, f"{out}/rank{t.global_rank}.pt")


if __name__ == "__main__":
    main_gpu(sys.argv[1]) if sys.argv[2:] == ["gpu"] else main(sys.argv[1])
