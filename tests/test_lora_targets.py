"""LoRA target selection on a CNN whose only Linear is the head (timm resnet10t): a refusal that names the fix."""

import pytest
import torch

from lightning_ensembles.ensembles.lora import LoRAEnsemble
from lightning_ensembles.ensembles.surgery import ConversionError

timm = pytest.importorskip("timm")


def _resnet():
    return timm.create_model("resnet10t", pretrained=False, num_classes=4, in_chans=1)


def test_targeting_the_per_member_head_is_refused_naming_head_none():
    with pytest.raises(ConversionError, match=r"'fc' is the per-member head.*head=None") as err:
        LoRAEnsemble(_resnet(), num_members=2, target_modules=["fc"], rank=2)
    assert "Available: []" in str(err.value)  # the head is no longer offered as a target


def test_with_head_none_the_head_is_the_lora_target():
    ens = LoRAEnsemble(_resnet(), num_members=2, target_modules=["fc"], rank=2, head=None)
    out = ens(torch.randn(3, 1, 32, 32))
    assert out.shape == (2, 3, 4)
    trainable = [n for n, p in ens.named_parameters() if p.requires_grad]
    assert trainable and all("fc" in n for n in trainable)
