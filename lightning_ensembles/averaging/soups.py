"""Model soups (Wortsman et al., 2022): average the weights of models that share an architecture."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from ..ensembles.base import Ensemble, aggregate_probs

__all__ = ["uniform_soup", "greedy_soup", "GreedySoup", "member_ingredients", "load_ingredient", "accuracy_score"]

Ingredient = Union[Mapping[str, Tensor], nn.Module, str, Path]


def load_ingredient(ingredient: Ingredient, prefix: str = "") -> dict[str, Tensor]:
    """A state dict from a state dict, a module, or a checkpoint path (Lightning ``.ckpt`` or ``torch.save``).

    ``prefix`` keeps only keys starting with it and strips it (e.g. ``"ensemble."`` to take the
    ensemble out of a Lightning checkpoint of an :class:`~lightning_ensembles.EnsembleClassifier`).
    """
    state: Mapping[str, Tensor]
    if isinstance(ingredient, nn.Module):
        state = ingredient.state_dict()
    elif isinstance(ingredient, (str, Path)):
        # weights_only: a checkpoint is data; loading one must never unpickle (run) arbitrary objects.
        loaded = torch.load(ingredient, map_location="cpu", weights_only=True)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    elif isinstance(ingredient, Mapping):
        state = ingredient
    else:
        raise ValueError(
            f"an ingredient must be a state dict, a module or a checkpoint path, got {type(ingredient).__name__}."
        )
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"no tensor of the ingredient starts with `prefix`={prefix!r}.")
    return {k: v.detach() for k, v in state.items()}


def member_ingredients(ensemble: Ensemble) -> list[dict[str, Tensor]]:
    """The state dict of every member of ``ensemble`` (members share an architecture), as soup ingredients."""
    return [ensemble.member(i).state_dict() for i in range(ensemble.num_members)]


def uniform_soup(ingredients: Iterable[Ingredient], prefix: str = "") -> dict[str, Tensor]:
    """Elementwise mean of the ingredients' floating tensors (integer buffers come from the first).

    Example:
        >>> import torch
        >>> uniform_soup([{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([3.0])}])
        {'w': tensor([2.])}
    """
    states = [load_ingredient(i, prefix) for i in ingredients]
    if not states:
        raise ValueError("`ingredients` is empty; give at least one state dict, module or checkpoint.")
    first = states[0]
    for k, s in enumerate(states[1:], start=1):
        if s.keys() != first.keys():
            diff = sorted(set(s) ^ set(first))[:5]
            raise ValueError(f"ingredient {k} does not share the architecture of ingredient 0 (differing keys {diff}).")
        bad = [n for n in first if s[n].shape != first[n].shape]
        if bad:
            raise ValueError(f"ingredient {k} has other shapes than ingredient 0 for {bad[:5]}.")
    soup = {}
    for n, t in first.items():
        if t.is_floating_point():
            soup[n] = torch.stack([s[n].to(t.device, torch.float64) for s in states]).mean(0).to(t.dtype)
        else:
            soup[n] = t.clone()
    return soup


@dataclass
class GreedySoup:
    """Result of :func:`greedy_soup`."""

    state_dict: dict[str, Tensor]
    """The soup's weights."""
    selected: list[int]
    """Indices of the ingredients in the soup, in the order they were added."""
    score: float
    """Held-out score of the soup."""
    ingredient_scores: list[float] = field(default_factory=list)
    """Held-out score of every ingredient alone."""


def greedy_soup(
    ingredients: Sequence[Ingredient],
    score_fn: Callable[[dict[str, Tensor]], float],
    prefix: str = "",
    higher_is_better: bool = True,
) -> GreedySoup:
    """Greedy soup: add ingredients in order of held-out score, keep one only if the soup's score strictly improves.

    ``score_fn(state_dict) -> float`` evaluates a weight set on held-out data (see
    :func:`accuracy_score`). The soup starts from the best single ingredient, so it never scores
    worse than it on that held-out data.

    Example:
        >>> import torch
        >>> ings = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([-9.0])}]
        >>> soup = greedy_soup(ings, lambda s: -abs(float(s["w"]) - 2.0))
        >>> soup.selected, float(soup.state_dict["w"])
        ([0, 1], 2.0)
    """
    states = [load_ingredient(i, prefix) for i in ingredients]
    if not states:
        raise ValueError("`ingredients` is empty; give at least one state dict, module or checkpoint.")
    sign = 1.0 if higher_is_better else -1.0
    scores = [float(score_fn(s)) for s in states]
    order = sorted(range(len(states)), key=lambda i: -sign * scores[i])  # stable: ties keep input order
    selected = [order[0]]
    soup, best = states[order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in selected + [i]])
        score = float(score_fn(candidate))
        if sign * score > sign * best:
            selected.append(i)
            soup, best = candidate, score
    return GreedySoup({k: v.clone() for k, v in soup.items()}, selected, best, scores)


def accuracy_score(module: nn.Module, loader: Iterable) -> Callable[[dict[str, Tensor]], float]:
    """A ``score_fn`` for :func:`greedy_soup`: accuracy of ``module`` with the given weights on ``loader``.

    Works for plain classifiers ``(B, C)`` and ensembles ``(M, B, C)`` (mean member probabilities).
    """
    import copy

    model = copy.deepcopy(module).eval()
    batches = list(loader)

    @torch.no_grad()
    def score(state: dict[str, Tensor]) -> float:
        model.load_state_dict(state)
        correct = total = 0
        for x, y in batches:
            out = model(x)
            probs = aggregate_probs(out) if isinstance(model, Ensemble) else out.softmax(-1)
            correct += int((probs.argmax(-1) == y).sum())
            total += len(y)
        return correct / max(total, 1)

    return score
