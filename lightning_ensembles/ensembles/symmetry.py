"""Multi-Symmetry Ensembles: members that hold opposing symmetry hypotheses instead of differing seeds.

Loh et al., "Multi-Symmetry Ensembles: Improving Diversity and Generalization via Opposing
Symmetries" (ICML 2023; code github.com/clott3/multi-sym-ensem). For a transformation group G
(rotations by 90 degrees, horizontal flips, or both) each member is trained as

* ``invariant``: on randomly transformed inputs (with probability ``p_transform`` a uniformly drawn
  non-identity element, as in the paper), optionally with a consistency term between the predictions
  for ``x`` and ``g x``;
* ``equivariant``: on untransformed inputs plus an auxiliary head that predicts which ``g`` was
  applied to ``g x`` from the backbone's features, loss ``L = CE + aux_weight * CE_aux`` (0.4 in the paper);
* ``plain``: neither.

Members are combined by averaging probabilities; :func:`greedy_member_selection` is the paper's
greedy ensembling step on validation NLL.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice
from .base import Ensemble, check_member_outputs
from .lora import _find_head
from .registry import register_method
from .reinit import reinitialize
from .surgery import set_submodule

__all__ = ["MultiSymmetryEnsemble", "SymmetryMember", "GROUPS", "transform", "greedy_member_selection"]

#: Transformation groups: name -> number of elements. Element ``e`` of ``d4`` is "flip if e >= 4,
#: then rotate by (e % 4) * 90 degrees"; ``rot90``'s element ``k`` rotates by k * 90 degrees
#: counter-clockwise; ``hflip``'s element 1 mirrors left-right. Element 0 is always the identity.
GROUPS: dict[str, int] = {"rot90": 4, "hflip": 2, "d4": 8}
HYPOTHESES = ("invariant", "equivariant")


def available_symmetries() -> list[str]:
    """Every valid symmetry name: ``"plain"`` and ``"<invariant|equivariant>-<group>"``."""
    return ["plain"] + [f"{h}-{g}" for h in HYPOTHESES for g in GROUPS]


def _transform_one(x: Tensor, group: str, element: int) -> Tensor:
    if group == "hflip":
        return x.flip(-1) if element else x
    if group == "d4" and element >= 4:
        x = x.flip(-1)
    return torch.rot90(x, element % 4, dims=(-2, -1))


def transform(x: Tensor, group: str, elements: Tensor | int) -> Tensor:
    """Apply group element ``elements[b]`` to image ``x[b]`` (``(B, ..., H, W)``; rotations need H == W).

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> transform(x, "rot90", 1)[0, 0].tolist()  # 90 degrees counter-clockwise
        [[1.0, 3.0], [0.0, 2.0]]
    """
    if group not in GROUPS:
        raise ValueError(f"unknown transformation group {group!r}; available: {sorted(GROUPS)}.")
    if group != "hflip" and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations by 90 degrees need square inputs (H == W), got shape {tuple(x.shape)}.")
    if isinstance(elements, int):
        return _transform_one(x, group, elements)
    out = x.clone()
    for e in range(GROUPS[group]):  # at most 8 group elements: one vectorised op per element
        sel = elements == e
        if e and bool(sel.any()):
            out[sel] = _transform_one(x[sel], group, e)
    return out


class SymmetryMember(nn.Module):
    """One member: ``body`` (the backbone without its head) -> ``head``; equivariant members also
    carry ``aux_head`` predicting the applied group element from the body's features. Takes
    ownership of ``backbone`` (its head is moved out and replaced by ``nn.Identity`` in place).

    Example:
        >>> import torch
        >>> from lightning_ensembles import MLP
        >>> m = SymmetryMember(MLP(64, 10, hidden=(32,)), "equivariant-rot90", head_path="net.3")
        >>> m(torch.randn(2, 1, 8, 8)).shape, m.aux_head.out_features
        (torch.Size([2, 10]), 4)

    Args:
        backbone: the member's network (taken over: its head is moved out).
        symmetry: the member's hypothesis, one of :func:`available_symmetries`.
        head_path: path of the backbone's classification ``nn.Linear``.
    """

    head: nn.Linear
    aux_head: nn.Linear | None

    def __init__(self, backbone: nn.Module, symmetry: str, head_path: str) -> None:
        super().__init__()
        if symmetry not in available_symmetries():
            raise ValueError(f"unknown symmetry {symmetry!r}; available: {available_symmetries()}.")
        self.symmetry = symmetry
        self.hypothesis, _, self.group = symmetry.partition("-")
        self.head_path = head_path
        head = backbone.get_submodule(head_path)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head {head_path!r} is a {type(head).__name__}; it must be the classification nn.Linear.")
        self.head = head
        body = backbone
        set_submodule(body, head_path, nn.Identity())
        self.body = body
        self.aux_head = (
            nn.Linear(self.head.in_features, GROUPS[self.group]) if self.hypothesis == "equivariant" else None
        )

    def features(self, x: Tensor) -> Tensor:
        """The head's input for ``x``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def as_backbone(self) -> nn.Module:
        """A standalone copy with the backbone's original structure (head restored, no auxiliary head)."""
        model = copy.deepcopy(self.body)
        set_submodule(model, self.head_path, copy.deepcopy(self.head))
        return model


def _nll_of_mean(log_probs: Tensor, targets: Tensor) -> float:
    """NLL of the mean probability of members ``log_probs`` ``(K, B, C)``."""
    mixed = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    return float(F.nll_loss(mixed, targets))


@torch.no_grad()
def greedy_member_selection(member_logits: Tensor, targets: Tensor) -> tuple[list[int], list[float]]:
    """Greedy forward selection of members on validation NLL of the mean probability.

    Starts from the member with the lowest NLL and repeatedly adds the member that lowers the
    ensemble NLL most, until every member is in; returns the best prefix of that path (so the
    subset is never worse than the full ensemble on this data) and the NLL after each addition.

    Example:
        >>> import torch
        >>> logits = torch.randn(3, 50, 4)
        >>> y = torch.randint(0, 4, (50,))
        >>> logits[1] = 10 * torch.nn.functional.one_hot(y, 4)  # a near-perfect member
        >>> greedy_member_selection(logits, y)[0]
        [1]
    """
    check_member_outputs(member_logits, name="member_logits")
    log_probs = F.log_softmax(member_logits.float(), dim=-1)
    remaining = list(range(log_probs.shape[0]))
    chosen: list[int] = []
    path: list[float] = []
    while remaining:
        scores = [_nll_of_mean(log_probs[chosen + [j]], targets) for j in remaining]
        best = min(range(len(remaining)), key=scores.__getitem__)
        chosen.append(remaining.pop(best))
        path.append(scores[best])
    k = min(range(len(path)), key=path.__getitem__)  # first minimum: the smallest best subset
    return chosen[: k + 1], path


@register_method("symmetry")
class MultiSymmetryEnsemble(Ensemble):
    """Members trained under different symmetry hypotheses (invariant / equivariant / plain).

    Args:
        backbone: a classifier (or its name); every member is a copy (re-initialised with ``init="reinit"``).
        num_members: M.
        symmetries: one name per member from :func:`available_symmetries` (``"plain"``,
            ``"invariant-rot90"``, ``"equivariant-hflip"``, ``"invariant-d4"``, ...). Default: alternate
            ``"invariant-rot90"`` and ``"equivariant-rot90"``.
        aux_weight: weight of an equivariant member's rotation/flip-prediction loss (paper: 0.4).
        consistency_weight: weight of an invariant member's consistency term
            ``KL(p(y | x) || p(y | g x))`` (0 disables it and saves a forward pass).
        p_transform: probability that an invariant member sees a non-identity element (paper: 0.5).
        head: the backbone's classification ``nn.Linear`` (``"auto"``: timm's ``get_classifier()`` or
            the last ``nn.Linear``); its input are the features the auxiliary head reads.
        init: ``"reinit"`` (independent initialisations) or ``"copy"`` (all from the given weights).
        backbone_kwargs: arguments building ``backbone`` when it is a name (see ``build_backbone``).

    Evaluation: ``forward(x) -> (M, B, C)``, each member on the untransformed ``x``.

    Training hook (called by ``EnsembleClassifier`` when the ensemble defines it)::

        member_logits, extra_loss, logs = ensemble.training_outputs(x, y)

    ``member_logits`` ``(M, B, C)`` are what each member's cross-entropy with ``y`` is computed on
    (invariant members: on their transformed inputs). ``extra_loss`` is the mean over members of
    their auxiliary terms (``aux_weight * CE_aux`` and ``consistency_weight * KL``), on the same scale
    as the mean member cross-entropy, so ``mean CE + extra_loss`` is the mean over members of each
    member's own loss. ``logs`` holds detached scalars (``aux_loss/<i>``, ``aux_acc/<i>``, ...).

    Example:
        >>> import torch
        >>> from lightning_ensembles import MLP
        >>> ens = MultiSymmetryEnsemble(MLP(64, 10, hidden=(32,)), num_members=3,
        ...                             symmetries=["invariant-rot90", "equivariant-rot90", "plain"])
        >>> x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
        >>> ens(x).shape
        torch.Size([3, 5, 10])
        >>> logits, extra, logs = ens.training_outputs(x, y)
        >>> logits.shape, extra.dim(), sorted(logs)
        (torch.Size([3, 5, 10]), 0, ['aux_acc/1', 'aux_loss/1'])
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        num_members: int = 4,
        symmetries: Sequence[str] | None = None,
        aux_weight: float = 0.4,
        consistency_weight: float = 0.0,
        p_transform: float = 0.5,
        head: str = "auto",
        init: Literal["reinit", "copy"] = "reinit",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        backbone = self.build_backbone(backbone, backbone_kwargs)
        if symmetries is None:
            symmetries = [("invariant-rot90", "equivariant-rot90")[i % 2] for i in range(num_members)]
        if isinstance(symmetries, str):
            symmetries = [symmetries]
        symmetries = list(symmetries)
        unknown = [s for s in symmetries if s not in available_symmetries()]
        if unknown:
            raise ValueError(f"unknown `symmetries` {unknown}; available: {available_symmetries()}.")
        if len(symmetries) != num_members:
            raise ValueError(
                f"`symmetries` has {len(symmetries)} names for num_members={num_members}; give one per member."
            )
        check_choice("init", init, ("reinit", "copy"))
        if not 0.0 <= p_transform <= 1.0:
            raise ValueError(f"`p_transform` must be in [0, 1], got {p_transform}.")
        if aux_weight < 0 or consistency_weight < 0:
            raise ValueError("`aux_weight` and `consistency_weight` must be >= 0.")
        head_path = _find_head(backbone, head)
        if head_path is None:
            raise ValueError("`head` must name the backbone's classification nn.Linear (or 'auto').")
        self.symmetries = symmetries
        self.aux_weight, self.consistency_weight, self.p_transform = aux_weight, consistency_weight, p_transform
        members = []
        for s in symmetries:
            copy_ = copy.deepcopy(backbone)
            if init == "reinit":
                reinitialize(copy_)
            members.append(SymmetryMember(copy_, s, head_path))
        # Members run in a Python loop: each sees its own transformed input and some have an extra
        # head, so there is no shared computation to vectorise (M is small, 2-4 in the paper).
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        """Member logits ``(M, B, C)`` on the untransformed input."""
        return torch.stack([m(x) for m in self.members])

    def member(self, index: int) -> nn.Module:
        """Standalone copy of member ``index`` with the backbone's structure (no auxiliary head)."""
        return self._members()[self._check_index(index)].as_backbone()

    def _members(self) -> list[SymmetryMember]:
        return [cast(SymmetryMember, m) for m in self.members]

    def _random_elements(self, group: str, n: int, device: torch.device, p_non_identity: float) -> Tensor:
        size = GROUPS[group]
        non_identity = torch.randint(1, size, (n,), device=device)
        apply = torch.rand(n, device=device) < p_non_identity
        return torch.where(apply, non_identity, torch.zeros_like(non_identity))

    def training_outputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Member logits for the classification loss, the mean auxiliary loss, and logs (see class doc)."""
        outs, extra, logs = [], x.new_zeros(()), {}
        for i, m in enumerate(self._members()):
            if m.hypothesis == "invariant":
                g = self._random_elements(m.group, x.shape[0], x.device, self.p_transform)
                xg = transform(x, m.group, g)
                if self.consistency_weight > 0:
                    both = m(torch.cat([x, xg]))
                    clean, logits = both.chunk(2)
                    kl = F.kl_div(
                        F.log_softmax(logits, -1), F.log_softmax(clean, -1), log_target=True, reduction="batchmean"
                    )
                    extra = extra + self.consistency_weight * kl
                    logs[f"consistency/{i}"] = kl.detach()
                else:
                    logits = m(xg)
            elif m.hypothesis == "equivariant":
                # Uniform over all elements (identity included) so the auxiliary task is balanced.
                g = self._random_elements(m.group, x.shape[0], x.device, 1.0 - 1.0 / GROUPS[m.group])
                feats = m.features(torch.cat([x, transform(x, m.group, g)]))  # one pass for both views
                clean, moved = feats.chunk(2)
                logits = m.head(clean)
                aux_logits = cast(nn.Linear, m.aux_head)(moved)  # equivariant members have one
                aux = F.cross_entropy(aux_logits, g)
                extra = extra + self.aux_weight * aux
                logs[f"aux_loss/{i}"] = aux.detach()
                logs[f"aux_acc/{i}"] = (aux_logits.argmax(-1) == g).float().mean().detach()
            else:
                logits = m(x)
            outs.append(logits)
        return torch.stack(outs), extra / self.num_members, logs

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean over members of each member's full loss (cross-entropy + its auxiliary terms)."""
        logits, extra, _ = self.training_outputs(x, y)
        m, b, c = logits.shape
        return F.cross_entropy(logits.reshape(m * b, c), y.repeat(m)) + extra

    @torch.no_grad()
    def predict_transformation(self, x: Tensor, index: int) -> Tensor:
        """Equivariant member ``index``'s logits over group elements for (transformed) inputs ``x``."""
        m = self._members()[self._check_index(index)]
        if m.aux_head is None:
            equivariant = [i for i, s in enumerate(self.symmetries) if s.startswith("equivariant")]
            raise ValueError(
                f"member {index} is {m.symmetry!r} and has no auxiliary head; equivariant members: {equivariant}."
            )
        return m.aux_head(m.features(x))

    @torch.no_grad()
    def select_members(self, x: Tensor, y: Tensor, batch_size: int = 512, prune: bool = False) -> list[int]:
        """Greedy member selection on validation data (see :func:`greedy_member_selection`).

        With ``prune=True`` the ensemble keeps only the selected members (``num_members`` shrinks).
        """
        was_training = self.training
        self.eval()
        logits = torch.cat([self(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)], dim=1)
        self.train(was_training)
        chosen, _ = greedy_member_selection(logits, y)
        if prune:
            self.keep_members(chosen)
        return chosen

    def keep_members(self, indices: Sequence[int]) -> None:
        """Keep only members ``indices`` (in that order), e.g. the result of :meth:`select_members`."""
        indices = [self._check_index(i) for i in indices]
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(f"`indices` must be distinct member indices, got {list(indices)}.")
        self.members = nn.ModuleList([self.members[i] for i in indices])
        self.symmetries = [self.symmetries[i] for i in indices]
        self.num_members = len(indices)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, symmetries={self.symmetries}, aux_weight={self.aux_weight:g}"
