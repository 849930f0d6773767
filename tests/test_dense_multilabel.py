"""Dense (segmentation) and multilabel outputs: aggregation, metrics against references, constant memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from lightning_ensembles import DeepEnsemble
from lightning_ensembles.metrics import BrierScore, NegativeLogLikelihood
from lightning_ensembles.metrics.dense import DenseMeanIoU, DenseMetrics, aggregate_dense_probs, pixels
from lightning_ensembles.metrics.multilabel import MultilabelCalibrationError, MultilabelMetrics, aggregate_sigmoid


def _dense(m=3, b=2, c=4, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(m, b, c, h, w, generator=g), torch.randint(0, c, (b, h, w), generator=g)


def test_dense_aggregation_is_per_pixel_mean_softmax_and_fits_the_member_contract():
    logits, _ = _dense()
    probs = aggregate_dense_probs(logits)
    assert probs.shape == (2, 4, 6, 5)
    assert torch.allclose(probs[1, :, 2, 3], logits[:, 1, :, 2, 3].softmax(-1).mean(0))
    ens = DeepEnsemble(nn.Conv2d(3, 4, 3, padding=1), num_members=3)
    assert ens(torch.randn(2, 3, 6, 5)).shape == (3, 2, 4, 6, 5)
    with pytest.raises(ValueError, match=r"\(M, B, C, \*spatial\)"):
        aggregate_dense_probs(torch.randn(3, 2, 4))


def test_pixelwise_metrics_equal_classification_metrics_on_the_pixels():
    logits, target = _dense()
    target[0, 0, :] = 255  # ignored pixels
    m = DenseMetrics(num_classes=4, ignore_index=255)
    m.update(logits[:, :1], target[:1])  # two updates: sums accumulate
    m.update(logits[:, 1:], target[1:])
    out = m.compute()
    probs = aggregate_dense_probs(logits)
    rows = probs.permute(0, 2, 3, 1).reshape(-1, 4)
    flat = target.reshape(-1)
    keep = flat != 255
    rows, flat = rows[keep], flat[keep]
    nll, brier = NegativeLogLikelihood(), BrierScore()
    nll.update(rows, flat)
    brier.update(rows, flat)
    ref_ece = MulticlassCalibrationError(num_classes=4, n_bins=15)(rows, flat)
    assert float(out["nll"]) == pytest.approx(float(nll.compute()), rel=1e-5)
    assert float(out["brier"]) == pytest.approx(float(brier.compute()), rel=1e-5)
    assert float(out["ece"]) == pytest.approx(float(ref_ece), abs=1e-5)
    assert float(out["pixel_acc"]) == pytest.approx(float((rows.argmax(-1) == flat).float().mean()))


def test_dense_metrics_keep_constant_memory():
    m = DenseMetrics(num_classes=4)
    sizes = lambda: sorted(t.numel() for t in m.state_dict().values())  # noqa: E731
    m.update(*_dense(h=4, w=4))
    before = sizes()
    m.update(*_dense(b=2, h=64, w=64, seed=1))
    assert sizes() == before


def test_miou_matches_scikit_learn_and_ignores_pixels():
    from sklearn.metrics import jaccard_score

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 5, (3, 10, 10), generator=g), torch.randint(0, 4, (3, 10, 10), generator=g)
    m = DenseMeanIoU(num_classes=5)
    m.update(pred, target)
    ref = jaccard_score(target.flatten().numpy(), pred.flatten().numpy(), average="macro")
    assert float(m.compute()) == pytest.approx(ref, rel=1e-6)
    target[0] = 255
    m2 = DenseMeanIoU(num_classes=5, ignore_index=255)
    m2.update(pred, target)
    keep = target.flatten() != 255
    ref2 = jaccard_score(target.flatten()[keep].numpy(), pred.flatten()[keep].numpy(), average="macro")
    assert float(m2.compute()) == pytest.approx(ref2, rel=1e-6)
    with pytest.raises(ValueError, match="targets must lie in"):
        DenseMeanIoU(num_classes=2).update(pred, target)


def test_pixels_refuses_mismatched_targets():
    with pytest.raises(ValueError, match=r"dense targets must be \(B, \*spatial\)"):
        pixels(torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))


def _multilabel(m=4, b=300, n_labels=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(m, b, n_labels, generator=g), torch.randint(0, 2, (b, n_labels), generator=g)


def test_multilabel_ece_per_label_matches_torchmetrics_binary_ece():
    logits, target = _multilabel()
    probs = aggregate_sigmoid(logits)
    assert torch.allclose(probs, logits.sigmoid().mean(0))
    m = MultilabelCalibrationError(num_labels=5, n_bins=15, reduction="none")
    m.update(probs[:100], target[:100])
    m.update(probs[100:], target[100:])
    ref = torch.stack([BinaryCalibrationError(n_bins=15)(probs[:, i], target[:, i]) for i in range(5)])
    assert torch.allclose(m.compute(), ref, atol=1e-5)


def test_multilabel_metrics():
    logits, target = _multilabel()
    m = MultilabelMetrics(num_labels=5)
    m.update(logits, target)
    out = m.compute()
    p = aggregate_sigmoid(logits)
    assert float(out["nll"]) == pytest.approx(
        float(F.binary_cross_entropy(p, target.float(), reduction="sum") / 300), rel=1e-5
    )
    assert float(out["brier"]) == pytest.approx(float(((p - target) ** 2).sum(-1).mean()), rel=1e-5)
    assert float(out["label_acc"]) == pytest.approx(float(((p >= 0.5) == target.bool()).float().mean()))
    assert float(out["exact_match"]) == pytest.approx(float(((p >= 0.5) == target.bool()).all(-1).float().mean()))
    assert float(out["ece"]) == pytest.approx(float(np.mean([float(out[f"ece/{i}"]) for i in range(5)])))
    with pytest.raises(ValueError, match="0/1 per label"):
        m.update(logits, 2 * target)


# ---------------------------------------------------------------- through the modules and callbacks
def _seg_data(n=96, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, size, size, generator=g) > 0.6).long()
    masks[:, :2] = 2  # a band of class 2 on top
    x = torch.tensor([0.0, 1.0, -1.0])[masks] + 0.3 * torch.randn(n, size, size, generator=g)
    return x.unsqueeze(1), masks


def _fcn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))


def test_dense_task_trains_logs_pixel_metrics_and_feeds_calibration_callbacks():
    from conftest import quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.callbacks import TemperatureScaling

    torch.manual_seed(0)
    x, y = _seg_data()
    y[:, -1, -1] = 255  # an ignored pixel per image
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    model = EnsembleClassifier(
        backbone=_fcn(),
        num_members=2,
        method="packed",
        ensemble_kwargs={"alpha": 2},
        task="dense",
        ignore_index=255,
        lr=1e-2,
    )
    ts = TemperatureScaling(min_samples=10)
    trainer = quiet_trainer(max_epochs=8, num_sanity_val_steps=0, callbacks=[ts])
    trainer.fit(model, train, train)
    m = trainer.callback_metrics
    assert float(m["val/pixel_acc"]) > 0.9 and float(m["val/miou"]) > 0.8
    assert ts.is_fitted and ts.last_fit.num_samples == 96 * 63  # pixels as samples, ignored ones out
    out = trainer.predict(model, DataLoader(TensorDataset(x[:4]), batch_size=4))[0]
    assert out["probs"].shape == (4, 3, 8, 8) and out["member_probs"].shape == (2, 4, 3, 8, 8)
    assert out["entropy"].shape == (4, 8, 8) and bool((out["mutual_information"] >= -1e-6).all())
    assert out["calibrated_probs"].shape == (4 * 64, 3)  # per pixel, row-major
    assert torch.allclose(out["calibrated_probs"].reshape(4, 8, 8, 3).sum(-1), torch.ones(4, 8, 8), atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(B, \*spatial\) class indices"):
        model.member_loss(model(x[:2]), y[:2, :4])


def test_multilabel_task_on_digit_pairs():
    from _models import mlp_classifier
    from conftest import quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ensembles.data.digits import load_digits_tensors

    torch.manual_seed(0)
    xd, yd = load_digits_tensors()
    a, b = torch.randint(0, len(yd), (1200,)), torch.randint(0, len(yd), (1200,))
    x = torch.cat([xd[a], xd[b]], -1)
    y = torch.zeros(1200, 10, dtype=torch.long)
    y[torch.arange(1200), yd[a]] = 1
    y[torch.arange(1200), yd[b]] = 1
    model = mlp_classifier(2, in_features=128, task="multilabel", lr=3e-3)
    trainer = quiet_trainer(max_epochs=6, num_sanity_val_steps=0)
    trainer.fit(
        model,
        DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(x[1000:], y[1000:]), batch_size=100),
    )
    m = trainer.callback_metrics
    assert float(m["val/label_acc"]) > 0.9 and "val/ece/9" in m
    out = trainer.predict(model, DataLoader(TensorDataset(x[:5]), batch_size=5))[0]
    assert torch.allclose(out["probs"], model(x[:5]).sigmoid().mean(0))
