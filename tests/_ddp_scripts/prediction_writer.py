"""PredictionWriter under DDP (2 CPU processes, gloo): one file, dataset order, no padded duplicates.

python prediction_writer.py OUT_DIR    # writes OUT_DIR/ddp.csv and OUT_DIR/ddp.npy
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import is_launcher
from common import trainer as ddp_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.callbacks import PredictionWriter

N = 101  # odd: DistributedSampler pads one duplicate


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs={"in_features": 8, "out_features": 3})
    torch.save(model.state_dict(), out / "weights.pt") if is_launcher() else None
    x = torch.randn(N, 8, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x), batch_size=16)
    writers = [PredictionWriter(out / "ddp.csv", members=True), PredictionWriter(out / "ddp.npy", members=True)]
    trainer = ddp_trainer(strategy="ddp", devices=2, callbacks=writers)
    trainer.predict(model, loader, return_predictions=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
