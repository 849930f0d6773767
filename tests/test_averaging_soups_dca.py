"""Model soups and Deep Combinatorial Aggregation."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles import MLP, DeepEnsemble
from lightning_ensembles.averaging import (
    CombinatorialEnsemble,
    DCAConsistency,
    accuracy_score,
    greedy_soup,
    member_ingredients,
    split_by_depth,
    uniform_soup,
)


def _blobs(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = torch.randint(3, (n,), generator=g)
    return centers[y] + 0.8 * torch.randn(n, 2, generator=g), y


def test_uniform_soup_mean_and_checkpoint_loading(tmp_path):
    nets = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    for k, net in enumerate(nets):
        net[1].num_batches_tracked.fill_(k + 1)
    torch.save({"state_dict": {f"model.{k}": v for k, v in nets[1].state_dict().items()}}, tmp_path / "b.ckpt")
    from_ckpt = uniform_soup([tmp_path / "b.ckpt"], prefix="model.")
    soup = uniform_soup([nets[0].state_dict(), from_ckpt, nets[2]])
    for name in ("0.weight", "0.bias", "1.running_mean"):
        manual = sum(dict(n.state_dict())[name] for n in nets) / 3
        torch.testing.assert_close(soup[name], manual)
    assert int(soup["1.num_batches_tracked"]) == 1  # integer buffers come from the first ingredient
    with pytest.raises(ValueError, match="architecture"):
        uniform_soup([nets[0], nn.Linear(3, 4)])


def test_greedy_soup_never_below_best_ingredient_and_rejects_the_harmful_one():
    x, y = _blobs()
    xv, yv = _blobs(seed=1)
    # Crafted ingredients: a good linear classifier with small perturbations, plus a harmful one.
    good_w = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    g = torch.Generator().manual_seed(0)
    ingredients = [{"weight": good_w + 0.8 * torch.randn(3, 2, generator=g), "bias": torch.zeros(3)} for _ in range(4)]
    ingredients.insert(2, {"weight": -5 * good_w, "bias": torch.zeros(3)})  # harmful: inverts the classes
    score = accuracy_score(nn.Linear(2, 3), [(xv, yv)])
    soup = greedy_soup(ingredients, score)
    assert 2 not in soup.selected
    assert soup.score >= max(soup.ingredient_scores)
    assert soup.score == pytest.approx(score(soup.state_dict))
    assert score(uniform_soup(ingredients)) < soup.score  # the uniform soup is hurt by the harmful ingredient
    # the selection is exactly the greedy rule, re-derived independently
    order = sorted(range(5), key=lambda i: -soup.ingredient_scores[i])
    kept, best = [order[0]], soup.ingredient_scores[order[0]]
    for i in order[1:]:
        s = score(uniform_soup([ingredients[j] for j in kept + [i]]))
        if s > best:
            kept, best = kept + [i], s
    assert kept == soup.selected


def test_soup_of_deep_ensemble_members():
    ens = DeepEnsemble(nn.Linear(4, 2), num_members=3)
    soup = uniform_soup(member_ingredients(ens))
    torch.testing.assert_close(soup["weight"], ens.stacked_parameters()["weight"].mean(0))


def test_dca_two_components_three_instances_enumerates_nine_combinations():
    backbone = MLP(4, 3, hidden=(8,))
    dca = CombinatorialEnsemble(backbone, components=["net.1", "net.3"], num_instances=3, eval_mode="all").eval()
    assert dca.combinations() == list(itertools.product(range(3), range(3)))
    x = torch.randn(6, 4)
    out = dca(x)
    assert out.shape == (9, 6, 3) and dca.num_members == 9
    # independent reference: combination (i, j) = instance i of layer 1 then instance j of layer 3
    layer1 = [backbone.net[1]] + [inst[0] for inst in dca.instances[0]]
    layer3 = [backbone.net[3]] + [inst[0] for inst in dca.instances[1]]
    for k, (i, j) in enumerate(dca.combinations()):
        ref = layer3[j](F.relu(layer1[i](x)))
        torch.testing.assert_close(out[k], ref)
        torch.testing.assert_close(dca.member(k)(x), ref)
    assert len({round(float(o.detach().sum()), 4) for o in out}) == 9  # re-initialised instances differ


def test_dcwa_weights_equal_the_instance_mean():
    backbone = MLP(4, 3, hidden=(8, 8))
    dca = CombinatorialEnsemble(backbone, components=2, num_instances=3)
    assert dca.component_paths == split_by_depth(backbone, 2) == [["net.1", "net.3"], ["net.5"]]
    avg = dca.weight_averaged()
    for k, paths in enumerate(dca.component_paths):
        for i, path in enumerate(paths):
            for name in ("weight", "bias"):
                instances = [getattr(backbone.get_submodule(path), name)] + [
                    getattr(inst[i], name) for inst in dca.instances[k]
                ]
                torch.testing.assert_close(getattr(avg.get_submodule(path), name), torch.stack(instances).mean(0))


def test_dca_training_draws_and_consistency_loss_decrease():
    torch.manual_seed(0)
    x, y = _blobs(100)
    dca = CombinatorialEnsemble(
        MLP(2, 3, hidden=(16,)), components=2, num_instances=3, draws_per_step=3, num_eval_samples=8
    ).train()
    assert dca(x).shape == (3, 100, 3)
    reg = DCAConsistency(weight=1.0)
    opt = torch.optim.Adam(dca.parameters(), lr=3e-2)
    losses = []
    for _ in range(25):
        out = dca(x)
        loss = F.cross_entropy(out.flatten(0, 1), y.repeat(3)) + reg(out, y, inputs=x, ensemble=dca)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    # every instance received gradient (random draws reach them all)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dca.instances.parameters())
    dca.eval()
    assert dca(x).shape == (8, 100, 3)


def test_dca_bad_arguments():
    with pytest.raises(ValueError, match="no module"):
        CombinatorialEnsemble(MLP(2, 3), components=["net.9"])
    with pytest.raises(ValueError, match="overlap"):
        CombinatorialEnsemble(MLP(2, 3), components=["net", "net.1"])
    with pytest.raises(ValueError, match="components"):
        CombinatorialEnsemble(MLP(2, 3, hidden=(4,)), components=5)


def test_dca_trains_in_ensemble_classifier_with_consistency_regularizer():
    from conftest import quiet_trainer

    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.data import DigitsDataModule

    dca = CombinatorialEnsemble(
        MLP(64, 10, hidden=(32,)), components=2, num_instances=3, draws_per_step=2, eval_mode="all"
    )
    model = EnsembleClassifier(ensemble=dca, regularizers=[DCAConsistency(weight=1.0)])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert "train/dcaconsistency" in trainer.callback_metrics
    assert "val/member_acc/8" in trainer.callback_metrics  # all 9 combinations evaluated
