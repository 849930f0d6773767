"""Small models the tests build in several files: a tiny timm ViT, digits MLPs (plain and as an ensemble module)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

#: ``vit_tiny_patch16_224`` shrunk to 32x32 inputs in 8x8 patches, two blocks and three classes.
TINY_VIT = {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3}


def tiny_vit(**overrides: Any) -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` built from :data:`TINY_VIT` with ``overrides`` on top (skips without timm)."""
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **overrides})


def fit_digits_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int) -> nn.Module:
    """A ``64 -> hidden -> 10`` ReLU MLP trained full-batch on ``(x, y)`` for ``steps`` Adam steps (lr 1e-2)."""
    net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def mlp_classifier(num_members: int, in_features: int = 64, **kwargs: Any):
    """``EnsembleClassifier`` of the built-in ``mlp`` backbone from ``in_features`` to 10 classes."""
    from lightning_ensembles import EnsembleClassifier

    backbone_kwargs = {"in_features": in_features, "out_features": 10}
    return EnsembleClassifier(backbone="mlp", num_members=num_members, backbone_kwargs=backbone_kwargs, **kwargs)
