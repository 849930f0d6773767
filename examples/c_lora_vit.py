"""(c) A LoRA-Ensemble of a ViT: one frozen backbone, four low-rank adapters and heads.

    python examples/c_lora_vit.py

No weights are downloaded: step 1 trains a small timm ViT on digits as a stand-in for a pretrained
backbone; step 2 freezes it and trains a 4-member `LoRAEnsemble` (rank 8 on the attention's q, k, v
and output projection, one head per member) from it. The table compares trainable parameters and
test metrics.
"""

import lightning as L
import timm
from _common import parse_args, trainer

from lightning_ensembles import EnsembleClassifier, LoRAEnsemble
from lightning_ensembles.data import DigitsDataModule


def vit():
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        depth=4,
        embed_dim=96,
        num_heads=3,
        pretrained=False,
    )


def main() -> None:
    args = parse_args(__doc__)
    dm = DigitsDataModule(batch_size=64)
    L.seed_everything(0)
    backbone = vit()
    single = EnsembleClassifier(
        backbone=backbone, num_members=1, method="deep", ensemble_kwargs={"init": "copy"}, lr=1e-3
    )
    t = trainer(args, epochs=20)
    t.fit(single, dm)
    res_single = t.test(single, dm, verbose=False)[0]
    pretrained = single.ensemble.member(0)  # the trained ViT, as a plain timm module

    L.seed_everything(1)
    lora = LoRAEnsemble(pretrained, num_members=4, rank=8)
    model = EnsembleClassifier(lora, lr=1e-3)
    t = trainer(args, epochs=10)
    t.fit(model, dm)
    res_lora = t.test(model, dm, verbose=False)[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\n{'model':<28}{'trainable':>11}{'acc':>8}{'NLL':>8}{'ECE':>8}")
    print(
        f"{'ViT (the backbone)':<28}{sum(p.numel() for p in pretrained.parameters()):>11,}"
        f"{res_single['test/acc']:>8.4f}{res_single['test/nll']:>8.4f}{res_single['test/ece']:>8.4f}"
    )
    print(
        f"{'LoRA-Ensemble M=4, rank 8':<28}{trainable:>11,}"
        f"{res_lora['test/acc']:>8.4f}{res_lora['test/nll']:>8.4f}{res_lora['test/ece']:>8.4f}"
    )


if __name__ == "__main__":
    main()
