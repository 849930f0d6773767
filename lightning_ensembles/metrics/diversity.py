"""Ensemble diversity from member probabilities ``(M, B, C)`` (member axis first, as every ensemble here).

All three keep two running sums (constant memory) and use natural logarithms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_probs
from ._running import PerSampleMean


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last axis; ``0 log 0 = 0``."""
    return torch.special.entr(probs).sum(-1)


def mutual_information(member_probs: Tensor) -> Tensor:
    """Per-sample ``H(mean_m p_m) - mean_m H(p_m)`` of ``(M, B, C)`` probabilities: ``(B,)``."""
    return entropy(member_probs.mean(0)) - entropy(member_probs).mean(0)


def pairwise_disagreement(member_probs: Tensor) -> Tensor:
    """Per-sample fraction of ordered member pairs ``i != j`` whose argmax classes differ: ``(B,)``."""
    m, _, c = member_probs.shape
    if m < 2:
        return member_probs.new_zeros(member_probs.shape[1])
    # Pairs that agree = sum over classes of n_c (n_c - 1); counting votes avoids the O(M^2) pair loop.
    votes = torch.nn.functional.one_hot(member_probs.argmax(-1), c).sum(0).double()  # (B, C)
    agree = (votes * (votes - 1)).sum(-1)
    return 1 - agree / (m * (m - 1))


class _MemberMean(PerSampleMean):
    higher_is_better = None

    def __init__(self, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validate_args = validate_args

    def _per_sample(self, member_probs: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, member_probs: Tensor) -> None:
        if self.validate_args:
            check_probs(member_probs, "member_probs", members=True)
        self._add(self._per_sample(member_probs.double()))


class MutualInformation(_MemberMean):
    r"""Mean mutual information between prediction and member, ``H(mean_m p_m) - mean_m H(p_m)``
    (the epistemic part of the predictive entropy; generalised Jensen-Shannon divergence).

    Same value as torch-uncertainty's ``MutualInformation`` on ``member_probs.transpose(0, 1)``
    (torch-uncertainty takes ``(B, M, C)`` and clamps per-sample values at 0; exact arithmetic never
    goes below 0 and we compute in float64 instead).

    Args:
        validate_args: check that ``member_probs`` are ``(M, B, C)`` probabilities; ``False`` skips it.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = MutualInformation()
        >>> m.update(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # two certain members that disagree
        >>> round(float(m.compute()), 4)  # log 2
        0.6931
    """

    def _per_sample(self, member_probs: Tensor) -> Tensor:
        return mutual_information(member_probs)


class Disagreement(_MemberMean):
    r"""Mean pairwise disagreement: fraction of member pairs whose argmax predictions differ.

    Same value as torch-uncertainty's ``Disagreement`` on ``member_probs.transpose(0, 1)``. A single member
    never disagrees (0).

    Args:
        validate_args: ``False`` skips the probability checks of ``update``.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> m = Disagreement()
        >>> m.update(torch.tensor([[[.9, .1]], [[.8, .2]], [[.3, .7]]]))  # votes 0, 0, 1
        >>> round(float(m.compute()), 4)
        0.6667
    """

    def _per_sample(self, member_probs: Tensor) -> Tensor:
        return pairwise_disagreement(member_probs)


class PredictiveEntropy(_MemberMean):
    r"""Mean entropy of the ensemble prediction ``H(mean_m p_m)`` (total uncertainty, nats).

    Args:
        validate_args: whether ``update`` checks its ``(M, B, C)`` member probabilities.
        **kwargs: options of ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> m = PredictiveEntropy()
        >>> m.update(torch.tensor([[[0.5, 0.5]]]))
        >>> round(float(m.compute()), 4)
        0.6931
    """

    def _per_sample(self, member_probs: Tensor) -> Tensor:
        return entropy(member_probs.mean(0))
