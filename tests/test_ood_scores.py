"""OOD scores: published formulas (energy, max logit), the member rule, selection in the metric set."""

import math

import pytest
import torch

from lightning_ensembles.metrics import OODAUROC, mutual_information
from lightning_ensembles.metrics.ood_scores import (
    OOD_SCORES,
    OODScoreMetrics,
    energy_score,
    max_logit_score,
    ood_score,
    variation_ratio,
)


def test_energy_matches_liu_et_al_formula():
    # E(x; f) = -T log sum_i exp(f_i / T) (Liu et al. 2020, eq. 3), by hand.
    z = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    e1 = -math.log(math.e + math.e**2 + math.e**3)
    assert energy_score(z).tolist() == pytest.approx([e1, -math.log(3)], abs=1e-12)
    e2 = -2 * math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    assert float(energy_score(z, temperature=2.0)[0]) == pytest.approx(e2, abs=1e-12)
    # T -> 0: the energy tends to -max logit
    assert float(energy_score(z, temperature=1e-3)[0]) == pytest.approx(-3.0, abs=1e-6)
    assert float(max_logit_score(z)[0]) == -3.0


def test_logit_scores_average_member_scores_not_logits():
    z = torch.tensor([[[4.0, 0.0]], [[0.0, 4.0]]])  # two confident members that disagree
    # mean of member max logits is 4; the max of the averaged logits would be 2
    assert float(max_logit_score(z)) == -4.0
    assert float(energy_score(z)) == pytest.approx(-math.log(math.exp(4) + 1))


def test_probability_scores():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, 4, generator=g)
    p = z.double().softmax(-1)
    assert torch.allclose(ood_score("mi", z), mutual_information(p))
    assert torch.allclose(ood_score("msp", z), -p.mean(0).amax(-1))
    assert torch.allclose(ood_score("msp", p.float(), inputs="probs"), -p.mean(0).amax(-1), atol=1e-6)
    votes = torch.tensor([[[1.0, 0, 0]], [[1.0, 0, 0]], [[0, 1.0, 0]], [[0, 0, 1.0]]])
    assert float(variation_ratio(votes)) == 0.5  # modal class has 2 of 4 votes
    assert float(variation_ratio(votes[:1])) == 0.0


def test_logit_scores_refuse_probabilities():
    p = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="needs member logits"):
        ood_score("energy", p, inputs="probs")
    with pytest.raises(ValueError, match="need member logits"):
        OODScoreMetrics(scores=("msp", "max_logit"), inputs="probs")
    with pytest.raises(ValueError, match="unknown OOD score"):
        OODScoreMetrics(scores=("odin",))
    with pytest.raises(ValueError, match="member axis first"):
        ood_score("msp", torch.randn(3, 4))


def test_metric_set_logs_every_selected_score_and_ranks():
    g = torch.Generator().manual_seed(1)
    ind = 5 * torch.randn(4, 300, 6, generator=g)
    ood = 0.3 * torch.randn(4, 300, 6, generator=g)
    m = OODScoreMetrics()
    m.update(ind, is_ood=False)
    m.update(ood, is_ood=torch.ones(300, dtype=torch.long))
    out = m.compute()
    assert set(out) == {f"ood_{k}_{s}" for s in OOD_SCORES for k in ("auroc", "aupr", "fpr95")}
    for s in OOD_SCORES:
        ref = OODAUROC()
        ref.update(
            torch.cat([ood_score(s, ind), ood_score(s, ood)]), torch.cat([torch.zeros(300), torch.ones(300)]).long()
        )
        assert float(out[f"ood_auroc_{s}"]) == pytest.approx(float(ref.compute()))
    # flat logits have a high energy and a low max logit: both separate well
    assert float(out["ood_auroc_energy"]) > 0.9 and float(out["ood_auroc_max_logit"]) > 0.9


def test_classifier_logs_the_selected_scores_per_score():
    from _models import mlp_classifier
    from conftest import quiet_trainer

    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.data import DigitsDataModule

    torch.manual_seed(0)
    dm = DigitsDataModule(ood_classes=(8, 9))
    model = mlp_classifier(3, lr=3e-3, ood_scores=["energy", "max_logit", "variation_ratio"])
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    res = trainer.test(model, dm, verbose=False)[0]
    assert {k for k in res if k.startswith("test/ood_")} == {
        f"test/ood_{m}_{s}" for m in ("auroc", "aupr", "fpr95") for s in ("energy", "max_logit", "variation_ratio")
    }
    with torch.no_grad():
        ind = torch.cat([model(x) for x, _ in dm.test_dataloader()[0]], 1)
        ood = torch.cat([model(x) for x, _ in dm.test_dataloader()[1]], 1)
    ref = OODAUROC()
    ref.update(
        torch.cat([energy_score(ind), energy_score(ood)]),
        torch.cat([torch.zeros(ind.shape[1]), torch.ones(ood.shape[1])]).long(),
    )
    assert res["test/ood_auroc_energy"] == pytest.approx(float(ref.compute()), abs=1e-5)
    with pytest.raises(ValueError, match="unknown OOD score"):
        EnsembleClassifier(backbone="mlp", ood_scores=["odin"], backbone_kwargs={"in_features": 4, "out_features": 3})
