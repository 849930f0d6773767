"""OOD scores of an ensemble from its member logits ``(M, B, C)``, and a metric set that ranks by any of them.

Every score returns ``(B,)`` with **higher = more likely out-of-distribution**, the convention of
:class:`~lightning_ensembles.metrics.OODAUROC` / ``OODAUPR`` / ``FPR95``.

Which input a score uses (the rule):

- **Probability scores** are computed on the ensemble's predictive distribution, the mean of member
  softmax probabilities (the one aggregation of this library) or, for the member-level ones, on the
  member probabilities: ``msp`` (``-max_k p_k``), ``entropy`` (``H(p)``), ``mi`` (mutual information
  ``H(p) - mean_m H(p_m)``), ``variation_ratio`` (``1 -`` fraction of members voting for the modal
  class). They work from member probabilities as well as logits.
- **Logit scores** need the logits themselves (a softmax discards the per-sample offset they depend
  on): ``max_logit`` (Hendrycks et al., 2022: ``-max_k z_k``) and ``energy`` (Liu et al., 2020: the
  free energy ``E = -T logsumexp(z / T)``, OOD score ``E``, i.e. ``-(negative energy)``). Member logits
  of different members live in different coordinates (each member's logits are defined up to its own
  offset), so an ensemble's logit score is the **mean over members of each member's score** — never
  a score of averaged logits. For one member both equal the published single-model formulas.

Example:
    >>> import torch
    >>> logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])  # 2 members, 1 sample
    >>> round(float(ood_score("energy", logits)), 4)  # -logsumexp([2, 0, 0]) for both members
    -2.2395
    >>> float(ood_score("variation_ratio", logits))  # the members vote 1:1
    0.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from .._checks import check_choice, check_finite
from .diversity import entropy
from .ood import FPR95, OODAUPR, OODAUROC

__all__ = [
    "LOGIT_SCORES",
    "OOD_SCORES",
    "PROB_SCORES",
    "OODScoreMetrics",
    "energy_score",
    "max_logit_score",
    "ood_score",
    "variation_ratio",
]


def _check_members(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"`{name}` must be member outputs (M, B, C) with the member axis first; got {shape}. "
            "A single model's (B, C) outputs: pass `outputs.unsqueeze(0)`."
        )
    check_finite(x, name)


def max_logit_score(member_logits: Tensor) -> Tensor:
    """``-max_k z_k`` per member, averaged over members: ``(M, B, C) -> (B,)`` (higher = more OOD)."""
    _check_members(member_logits, "member_logits")
    return -member_logits.double().amax(-1).mean(0)


def energy_score(member_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``E(x) = -T logsumexp(z / T)`` per member, averaged over members: ``(B,)``, higher = more OOD.

    Liu et al. (2020) detect OOD by a low negative energy ``-E``; this returns ``E`` so that, as
    for every score here, a higher value means more likely OOD.
    """
    _check_members(member_logits, "member_logits")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    z = member_logits.double()
    return (-temperature * torch.logsumexp(z / temperature, dim=-1)).mean(0)


def variation_ratio(member_probs: Tensor) -> Tensor:
    """``1 - max_c (votes for c) / M`` where each member votes for its argmax: ``(M, B, C) -> (B,)``.

    0 when all members agree, up to ``1 - 1/min(M, C)``; always 0 for one member.
    """
    _check_members(member_probs, "member_probs")
    m, _, c = member_probs.shape
    votes = torch.nn.functional.one_hot(member_probs.argmax(-1), c).sum(0)  # (B, C)
    return 1.0 - votes.amax(-1).double() / m


def _probs(member_logits: Tensor) -> Tensor:
    return member_logits.double().softmax(-1)


#: Scores computed from member probabilities (the rule in the module docstring). Each takes member probabilities.
PROB_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "msp": lambda p: -p.mean(0).amax(-1),
    "entropy": lambda p: entropy(p.mean(0)),
    "mi": lambda p: entropy(p.mean(0)) - entropy(p).mean(0),
    "variation_ratio": variation_ratio,
}
#: Scores that need member logits. Each takes member logits.
LOGIT_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "max_logit": max_logit_score,
    "energy": energy_score,
}
#: Every score name, in the order they are logged.
OOD_SCORES: tuple[str, ...] = ("msp", "entropy", "mi", "variation_ratio", "max_logit", "energy")
#: What the scores and :class:`OODScoreMetrics` can be given: member logits or member probabilities.
_INPUTS = ("logits", "probs")


def ood_score(name: str, outputs: Tensor, inputs: str = "logits") -> Tensor:
    """The OOD score ``name`` (see :data:`OOD_SCORES`) of member outputs ``(M, B, C)``: ``(B,)``, higher = more OOD.

    ``inputs="logits"`` (member logits) serves every score; ``inputs="probs"`` (member probabilities)
    serves the probability scores only.
    """
    check_choice("name", name, OOD_SCORES, hint="It names the OOD score.")
    check_choice("inputs", inputs, _INPUTS)
    _check_members(outputs, f"member_{inputs}")
    if name in LOGIT_SCORES:
        if inputs == "probs":
            raise ValueError(
                f"the {name!r} score needs member logits, but member probabilities were given: a softmax discards the "
                "per-sample offset it depends on. Pass the logits, or use a probability score "
                f"({', '.join(PROB_SCORES)})."
            )
        return LOGIT_SCORES[name](outputs)
    probs = _probs(outputs) if inputs == "logits" else outputs.double()
    return PROB_SCORES[name](probs)


class OODScoreMetrics(nn.Module):
    """OOD AUROC / AUPR / FPR95 (OOD positive) for each selected score of member outputs.

    ``update(member_outputs (M, B, C), is_ood)`` where ``is_ood`` is a bool for the whole batch or a
    ``(B,)`` 0/1 tensor; ``compute()`` returns ``{"ood_<metric>_<score>": value}`` (e.g.
    ``ood_auroc_energy``). ``inputs="probs"`` takes member probabilities and allows only the
    probability scores (an error names the logit ones otherwise).

    Args:
        scores: the names of the scores to rank by (default: every one of :data:`OOD_SCORES`).
        inputs: ``"logits"`` (member logits, default) or ``"probs"`` (member probabilities).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> m = OODScoreMetrics(scores=("energy", "msp"))
        >>> m.update(4 * torch.randn(3, 200, 5, generator=g), is_ood=False)  # confident in-distribution
        >>> m.update(0.5 * torch.randn(3, 200, 5, generator=g), is_ood=True)  # flat OOD logits
        >>> out = m.compute()
        >>> sorted(out)[:2], out["ood_auroc_energy"] > 0.9
        (['ood_aupr_energy', 'ood_aupr_msp'], tensor(True))
    """

    def __init__(self, scores: Sequence[str] = OOD_SCORES, inputs: str = "logits") -> None:
        super().__init__()
        scores = tuple(scores)
        unknown = [s for s in scores if s not in OOD_SCORES]
        if unknown or not scores:
            raise ValueError(f"unknown OOD score(s) {unknown or scores}; choose from {list(OOD_SCORES)}.")
        check_choice("inputs", inputs, _INPUTS)
        if inputs == "probs" and any(s in LOGIT_SCORES for s in scores):
            raise ValueError(
                f"scores {[s for s in scores if s in LOGIT_SCORES]} need member logits but inputs='probs'; drop them or "
                "pass member logits (inputs='logits')."
            )
        self.scores = scores
        self.inputs = inputs
        self.metrics = nn.ModuleDict(
            {s: MetricCollection({"auroc": OODAUROC(), "aupr": OODAUPR(), "fpr95": FPR95()}) for s in scores}
        )

    def _sets(self) -> dict[str, MetricCollection]:
        """The metric set of each score (an ``nn.ModuleDict`` reads its entries back as ``Module``)."""
        return {name: cast(MetricCollection, self.metrics[name]) for name in self.scores}

    def update(self, outputs: Tensor, is_ood: bool | Tensor) -> None:
        for name, metrics in self._sets().items():
            score = ood_score(name, outputs.detach(), self.inputs)
            labels = (
                is_ood.to(score.device)
                if isinstance(is_ood, Tensor)
                else torch.full_like(score, int(bool(is_ood)), dtype=torch.long)
            )
            metrics.update(score, labels)

    def compute(self) -> dict[str, Tensor]:
        return {f"ood_{k}_{name}": v for name, metrics in self._sets().items() for k, v in metrics.compute().items()}

    def reset(self) -> None:
        for metrics in self._sets().values():
            metrics.reset()
