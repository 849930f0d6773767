"""(g) Dense and multilabel outputs: a synthetic segmentation task and multilabel digit pairs, offline.

    python examples/g_segmentation_multilabel.py

Segmentation: 16x16 noisy images with squares (class 1, bright) and discs (class 2, dimmer) on a
background (class 0), generated here; a small fully-convolutional backbone, outputs ``(M, B, 3, 16, 16)``.
``EnsembleClassifier(task="dense")`` trains every member with per-pixel cross-entropy and reports pixel
accuracy, mIoU and pixel-wise NLL / Brier / ECE (constant memory).

Multilabel: two scikit-learn digits side by side (1x8x16); the labels are the digits present
(multi-hot over 10). ``EnsembleClassifier(task="multilabel")``: per-label binary cross-entropy, the
ensemble is the mean member sigmoid; label accuracy, exact match, NLL, Brier and per-label ECE.
Each task compares a single model with a 4-member deep ensemble.
"""

import lightning as L
import torch
from _common import parse_args, trainer
from torch import nn

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.data._tensor_dm import TensorDataModule
from lightning_ensembles.data.digits import load_digits_tensors


def make_segmentation(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(1, size, size)`` and class maps ``(size, size)``: 0 background, 1 square, 2 disc."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cls = int(torch.randint(1, 3, (1,), generator=g))
            r = int(torch.randint(2, 5, (1,), generator=g))
            cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=g))
            if cls == 1:
                region = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            else:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            masks[i][region] = cls
    intensity = torch.tensor([0.0, 1.0, 0.55])[masks]
    images = intensity + 0.3 * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), masks


def make_digit_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(1, 8, 16)`` of two digits side by side and their multi-hot labels ``(10,)``."""
    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, len(y), (n,), generator=g), torch.randint(0, len(y), (n,), generator=g)
    images = torch.cat([x[a], x[b]], dim=-1)
    labels = torch.zeros(n, 10, dtype=torch.long)
    labels[torch.arange(n), y[a]] = 1
    labels[torch.arange(n), y[b]] = 1
    return images, labels


class Tensors(TensorDataModule):
    def __init__(self, make, n: int, batch_size: int = 64) -> None:
        super().__init__(batch_size, shuffle_seed=0)
        self.make, self.n = make, n

    def build(self):
        x, y = self.make(self.n, seed=0)
        a, b = int(0.6 * self.n), int(0.8 * self.n)
        return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


def fcn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 1)
    )


def run(args, task: str, members: int, dm: TensorDataModule, epochs: int) -> dict[str, float]:
    L.seed_everything(0)
    if task == "dense":
        model = EnsembleClassifier(backbone=fcn(), num_members=members, task="dense", lr=3e-3)
    else:
        model = EnsembleClassifier(
            backbone="mlp",
            num_members=members,
            task="multilabel",
            lr=3e-3,
            backbone_kwargs={"in_features": 128, "out_features": 10, "hidden": [128, 128]},
        )
    t = trainer(args, epochs=epochs)
    t.fit(model, dm)
    return t.test(model, dm, verbose=False)[0]


def main() -> None:
    args = parse_args(__doc__)
    seg, pairs = Tensors(make_segmentation, 600), Tensors(make_digit_pairs, 3000)
    for task, dm, keys, epochs in (
        ("dense", seg, ("pixel_acc", "miou", "nll", "brier", "ece"), 15),
        ("multilabel", pairs, ("label_acc", "exact_match", "nll", "brier", "ece"), 30),
    ):
        print(f"\n{task}: single model vs deep ensemble (M=4), test set")
        print(f"{'model':<14}" + "".join(f"{k:>12}" for k in keys))
        for name, m in (("single", 1), ("ensemble M=4", 4)):
            res = run(args, task, m, dm, epochs)
            print(f"{name:<14}" + "".join(f"{res[f'test/{k}']:>12.4f}" for k in keys))


if __name__ == "__main__":
    main()
