"""(a) An existing tutorial-style classifier becomes a 4-member ensemble by adding callbacks only.

    python examples/a_plugin_callbacks.py

`LitClassifier` below is written the way Lightning's documentation writes a classifier and knows
nothing about ensembles. The only change is the `callbacks=[...]` line.
"""

import lightning as L
import torch
import torch.nn.functional as F
from _common import parse_args, trainer
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ensembles.callbacks import Ensembling
from lightning_ensembles.data import DigitsDataModule


class LitClassifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_nll", F.cross_entropy(logits, y))
        accuracy(logits, y)
        self.log(f"{stage}_acc", accuracy)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    args = parse_args(__doc__)
    L.seed_everything(0)
    dm = DigitsDataModule()
    results = {}
    for name, callbacks in {"single model": [], "ensemble (callback)": [Ensembling(num_members=4)]}.items():
        module = LitClassifier()
        t = trainer(args, epochs=30, callbacks=callbacks)
        t.fit(module, dm)
        results[name] = t.test(module, dm, verbose=False)[0]
    print(f"\n{'':<22}{'test acc':>10}{'test NLL':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['test_acc']:>10.4f}{r['test_nll']:>10.4f}")
    # The user's module is unchanged, yet its members are reachable for inspection.
    x, y = dm.splits["test"].tensors
    module.eval()
    with torch.no_grad():
        members = module.model.ensemble(x)  # (M, B, C)
    member_nll = [F.cross_entropy(m, y).item() for m in members]
    ensemble_nll = F.nll_loss(members.softmax(-1).mean(0).log(), y).item()
    print(
        f"member NLLs {', '.join(f'{v:.4f}' for v in member_nll)}; ensemble {ensemble_nll:.4f} "
        f"(mean member {sum(member_nll) / len(member_nll):.4f})"
    )


if __name__ == "__main__":
    main()
