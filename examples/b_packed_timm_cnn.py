"""(b) A timm CNN converted into a Packed-Ensemble, trained on digits, against the single model.

    python examples/b_packed_timm_cnn.py

`PackedEnsemble` walks timm's `resnet10t` (stem, residual blocks, BatchNorm, head) and replaces every
layer by its grouped counterpart: 4 members in one network with alpha=2 (so twice the width split
four ways), no hand-written architecture.
"""

import lightning as L
import timm
from _common import parse_args, trainer

from lightning_ensembles import EnsembleClassifier, PackedEnsemble
from lightning_ensembles.data import DigitsDataModule


def resnet10t():
    # 8x8 single-channel digits: one input channel, small widths keep it fast on a CPU.
    return timm.create_model("resnet10t", num_classes=10, in_chans=1, pretrained=False)


def main() -> None:
    args = parse_args(__doc__)
    dm = DigitsDataModule(batch_size=64)
    rows = {}
    for name in ("single resnet10t", "packed M=4 alpha=2"):
        L.seed_everything(0)
        if name.startswith("single"):
            model = EnsembleClassifier(backbone=resnet10t(), num_members=1, lr=2e-3)
        else:
            ens = PackedEnsemble(resnet10t(), num_members=4, alpha=2, gamma=1)
            print(f"converted {len(ens.converted)} layers, e.g. {ens.converted[:4]}")
            model = EnsembleClassifier(ens, lr=2e-3)
        params = sum(p.numel() for p in model.parameters())
        t = trainer(args, epochs=15)
        t.fit(model, dm)
        rows[name] = (params, t.test(model, dm, verbose=False)[0])
    print(f"\n{'model':<22}{'params':>10}{'acc':>8}{'NLL':>8}{'ECE':>8}")
    for name, (params, r) in rows.items():
        print(f"{name:<22}{params:>10,}{r['test/acc']:>8.4f}{r['test/nll']:>8.4f}{r['test/ece']:>8.4f}")


if __name__ == "__main__":
    main()
