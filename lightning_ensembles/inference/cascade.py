"""Early-exit cascades over any ensemble: run members one after another, stop each sample early.

Window-based early exit (Xia & Bouganis, ICCV 2023): after stage ``k`` (the mean of the first ``k``
members' probabilities) a sample is *decided* unless its uncertainty lies inside a window
``(lower_k, upper_k)`` around the threshold ``t_k`` of the binary decision the ensemble serves:

* ``decision="selective"``: accept/reject at a target selective risk (``t_k``: the largest
  uncertainty at which the stage-``k`` ensemble's risk on validation data is at most ``target_risk``);
* ``decision="ood"``: in-/out-of-distribution at a target true-positive rate (``t_k``: the
  ``target_tpr`` quantile of the stage-``k`` uncertainty on in-distribution validation data).

Samples far from the threshold get the same decision from one member as from the ensemble, so only
those near it pay for more members. As in the paper's code the window is set in quantile units of the
validation uncertainties: ``width`` ``w`` gives ``(Q(q_t - w), Q(q_t + w))`` where ``q_t`` is the
fraction of validation samples at or below ``t_k``. ``exit_rule="confidence"`` is the earlier
early-exit baseline: the ``width`` most uncertain fraction of samples continue, ``(Q(1 - w), inf)``.
Width 0 stops every sample after the first member; width >= 1 runs every member on every sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..ensembles.base import Ensemble
from ..metrics import AURC, FPR95, OODAUROC, CoverageAtRisk, ExpectedCalibrationError, NegativeLogLikelihood
from .macs import MacCounter, macs_per_sample

__all__ = [
    "CascadeOutput",
    "EnsembleCascade",
    "evaluate_cascade",
    "prediction_metrics",
    "uncertainty",
]

ExitRule = Literal["window", "confidence"]
Decision = Literal["selective", "ood"]
Score = Literal["msp", "entropy"]


class CascadeOutput(NamedTuple):
    """Per-sample results of a cascade (or of any model, with ``members_used`` constant)."""

    probs: Tensor
    """Predictive distribution ``(B, C)``: mean probabilities of the members the sample used."""
    prediction: Tensor
    """Predicted class ``(B,)``."""
    score: Tensor
    """Uncertainty ``(B,)`` at exit (higher = more uncertain): ``1 - max prob`` or the entropy."""
    members_used: Tensor
    """Number of members ``(B,)`` evaluated for the sample (1 ... M)."""


def uncertainty(probs: Tensor, score: Score = "msp") -> Tensor:
    """Uncertainty of ``(B, C)`` probabilities: ``"msp"`` ``1 - max_k p_k``; ``"entropy"`` ``-sum p log p``."""
    if check_choice("score", score, ("msp", "entropy")) == "msp":
        return 1.0 - probs.max(-1).values
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def _member_probs(member: nn.Module, x: Tensor) -> Tensor:
    out = member(x)
    if not isinstance(out, Tensor):
        raise ValueError(f"a cascade member must return a logits tensor (B, C), got {type(out).__name__}.")
    if out.dim() == 3:  # a member that is itself an ensemble (M', B, C): its mean probability
        return out.float().softmax(-1).mean(0)
    if out.dim() != 2:
        raise ValueError(
            f"a cascade member must return logits (B, C) (or member logits (M', B, C)); got shape {tuple(out.shape)}."
        )
    return out.float().softmax(-1)


def _quantile(values: Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), min(max(q, 0.0), 1.0)))


def _selective_threshold(u: Tensor, correct: Tensor, risk: float) -> float:
    """Largest uncertainty ``t`` such that accepting ``u <= t`` has error rate <= ``risk`` (ties accepted together)."""
    u_sorted, order = u.double().sort()
    errors = (~correct[order]).double().cumsum(0)
    n = torch.arange(1, u.numel() + 1, dtype=torch.float64)
    last_of_tie = torch.cat([u_sorted[1:] != u_sorted[:-1], torch.tensor([True])])
    ok = torch.nonzero(((errors / n) <= risk) & last_of_tie).flatten()
    if ok.numel() == 0:  # no operating point reaches the risk: reject all but the most certain
        return float(u_sorted[0])
    return float(u_sorted[ok[-1]])


def simulate_cascade(member_probs: Tensor, lower: Tensor, upper: Tensor, score: Score = "msp") -> CascadeOutput:
    """The cascade's outputs from precomputed member probabilities ``(M, B, C)`` and windows ``(M - 1,)``.

    Equal to :meth:`EnsembleCascade.forward` on the same members (which evaluates members lazily); used
    to fit windows on validation data without re-running the members for each candidate width.
    """
    m, b, _ = member_probs.shape
    running = member_probs.cumsum(0) / torch.arange(1, m + 1, dtype=member_probs.dtype).view(m, 1, 1)
    u = torch.stack([uncertainty(running[k], score) for k in range(m)])  # (M, B)
    used = torch.full((b,), m, dtype=torch.long)
    undecided = torch.ones(b, dtype=torch.bool)
    for k in range(m - 1):
        stop = undecided & ~((u[k] > lower[k]) & (u[k] < upper[k]))
        used[stop] = k + 1
        undecided &= ~stop
    rows = torch.arange(b)
    probs = running[used - 1, rows]
    return CascadeOutput(probs, probs.argmax(-1), u[used - 1, rows], used)


class EnsembleCascade(nn.Module):
    """Evaluate an ensemble's members one after another and stop each sample as soon as it is decided.

    Args:
        ensemble: any :class:`~lightning_ensembles.Ensemble` (deep, packed, LoRA, batch, snapshot ...:
            its members come from ``ensemble.member(i)``) or a sequence of models returning logits
            ``(B, C)``, e.g. single models of different sizes (soups, a small and a large net).
        exit_rule: ``"window"`` (the paper's rule around the decision threshold) or ``"confidence"``
            (continue only the most uncertain samples).
        decision: the binary decision the window is placed around, ``"selective"`` (selective
            classification at ``target_risk``) or ``"ood"`` (detection at ``target_tpr``).
        width: window half-width in quantile units of the validation uncertainty (``"confidence"``:
            the fraction of samples that continue at each stage). ``float("inf")`` runs every member.
            :meth:`fit_width` picks it on validation data.
        order: ``"given"`` (member order), ``"cost"`` (cheapest first, MACs counted at :meth:`fit`),
            or a list of member indices.
        score: ``"msp"`` (``1 - max prob``) or ``"entropy"``.

    Members are put in eval mode. ``forward(x)`` returns a :class:`CascadeOutput`; the batch shrinks to its undecided samples at each
    stage. Windows are buffers (``lower``, ``upper``), so a fitted cascade saves and loads with
    ``torch.load(weights_only=True)``.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble("mlp", num_members=3, backbone_kwargs={"in_features": 4, "out_features": 3})
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> cascade = EnsembleCascade(ens, exit_rule="window", width=0.1).fit(x, y)
        >>> out = cascade(x)
        >>> out.probs.shape, int(out.members_used.min()) >= 1, int(out.members_used.max()) <= 3
        (torch.Size([64, 3]), True, True)
        >>> bool((EnsembleCascade(ens, width=0.0).fit(x, y)(x).members_used == 1).all())
        True
    """

    lower: Tensor
    upper: Tensor
    thresholds: Tensor
    member_macs: Tensor
    fitted: Tensor

    def __init__(
        self,
        ensemble: Ensemble | Sequence[nn.Module],
        exit_rule: ExitRule = "window",
        decision: Decision = "selective",
        target_risk: float = 0.05,
        target_tpr: float = 0.95,
        width: float = 0.1,
        order: Literal["given", "cost"] | Sequence[int] = "given",
        score: Score = "msp",
    ) -> None:
        super().__init__()
        check_choice("exit_rule", exit_rule, ("window", "confidence"))
        check_choice("decision", decision, ("selective", "ood"))
        check_choice("score", score, ("msp", "entropy"))
        if not 0.0 <= target_risk <= 1.0 or not 0.0 < target_tpr <= 1.0:
            raise ValueError(
                f"`target_risk` must be in [0, 1] and `target_tpr` in (0, 1]; got {target_risk}, {target_tpr}."
            )
        self._check_width(width)
        if isinstance(ensemble, Ensemble):
            members = [ensemble.member(i) for i in range(ensemble.num_members)]
        elif isinstance(ensemble, (list, tuple, nn.ModuleList)) and all(isinstance(m, nn.Module) for m in ensemble):
            members = list(ensemble)
        else:
            raise ValueError(
                "`ensemble` must be a lightning_ensembles Ensemble or a list of nn.Modules returning logits; "
                f"got {type(ensemble).__name__}."
            )
        if not members:
            raise ValueError("`ensemble` has no members; give at least one model.")
        if isinstance(order, str):
            check_choice("order", order, ("given", "cost"), hint="Or pass a list of member indices.")
            indices = list(range(len(members)))
        else:
            indices = [int(i) for i in order]
            if sorted(indices) != list(range(len(members))):
                raise ValueError(
                    f"`order`={list(order)} must be a permutation of the member indices 0..{len(members) - 1}."
                )
        self.members = nn.ModuleList(members[i] for i in indices)
        self.order = indices
        self.order_rule = order if isinstance(order, str) else "given"
        self.exit_rule, self.decision, self.score = exit_rule, decision, score
        self.target_risk, self.target_tpr, self.width = float(target_risk), float(target_tpr), float(width)
        k = len(members) - 1
        self.register_buffer("lower", torch.full((k,), float("inf")))
        self.register_buffer("upper", torch.full((k,), float("-inf")))
        self.register_buffer("thresholds", torch.full((len(members),), float("nan")))
        self.register_buffer("member_macs", torch.full((len(members),), float("nan"), dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))
        self.eval()  # an inference tool: members predict in eval mode (dropout off, BatchNorm statistics)

    @staticmethod
    def _check_width(width: float) -> None:
        if not isinstance(width, (int, float)) or isinstance(width, bool) or not width >= 0:
            raise ValueError(f"`width` must be a number >= 0 (float('inf') runs every member), got {width!r}.")

    @property
    def num_members(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def member_probs(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """Probabilities of every member on every sample, ``(M, N, C)``, in cascade order (no early exit)."""
        self._check_inputs(x)
        parts = [torch.stack([_member_probs(m, xb) for m in self.members]) for xb in x.split(batch_size)]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def fit(
        self, x: Tensor, y: Tensor | None = None, width: float | None = None, batch_size: int = 1024
    ) -> EnsembleCascade:
        """Place each stage's window on validation data ``x`` (labels ``y`` for ``decision="selective"``).

        Also counts each member's MACs per sample on ``x[:1]`` (and orders members by it for
        ``order="cost"``). Returns ``self``.
        """
        self._check_inputs(x)
        if width is not None:
            self._check_width(width)
            self.width = float(width)
        if self.decision == "selective" and self.exit_rule == "window" and y is None:
            raise ValueError("decision='selective' places the window at a selective-risk threshold: pass labels `y`.")
        self._count_member_macs(x[:1])
        probs = self.member_probs(x, batch_size).cpu()
        self._set_windows(probs, None if y is None else y.cpu())
        return self

    def _count_member_macs(self, probe: Tensor) -> None:
        macs = torch.tensor([macs_per_sample(m, probe) for m in self.members], dtype=torch.float64)
        if self.order_rule == "cost":
            perm = sorted(range(len(macs)), key=lambda i: float(macs[i]))
            self.members = nn.ModuleList(self.members[i] for i in perm)
            self.order = [self.order[i] for i in perm]
            macs = macs[perm]
            self.order_rule = "given"  # ordered once; a later fit keeps this order
        self.member_macs.copy_(macs)

    def _set_windows(self, probs: Tensor, y: Tensor | None) -> None:
        lower, upper, thresholds = self._windows(probs, y, self.width)
        self.lower.copy_(lower)
        self.upper.copy_(upper)
        self.thresholds.copy_(thresholds)
        self.fitted.fill_(True)

    def _windows(self, probs: Tensor, y: Tensor | None, width: float) -> tuple[Tensor, Tensor, Tensor]:
        m = probs.shape[0]
        running = probs.cumsum(0) / torch.arange(1, m + 1, dtype=probs.dtype).view(m, 1, 1)
        lower = torch.empty(max(m - 1, 0))
        upper = torch.empty(max(m - 1, 0))
        thresholds = torch.empty(m)
        inf = float("inf")
        for k in range(m):
            u = uncertainty(running[k], self.score)
            if self.decision == "selective":
                if y is None:
                    thresholds[k] = float("nan")
                else:
                    thresholds[k] = _selective_threshold(u, running[k].argmax(-1) == y, self.target_risk)
            else:
                thresholds[k] = _quantile(u, self.target_tpr)
            if k == m - 1:
                break
            if self.exit_rule == "confidence":
                lower[k] = -inf if width >= 1 else _quantile(u, 1.0 - width)
                upper[k] = inf
            else:
                q = float((u.double() <= float(thresholds[k])).double().mean())
                lower[k] = -inf if q - width <= 0 else _quantile(u, q - width)
                upper[k] = inf if q + width >= 1 else _quantile(u, q + width)
                if width == 0:  # an empty window, whatever the quantile interpolation gives
                    lower[k], upper[k] = inf, -inf
        return lower, upper, thresholds

    @torch.no_grad()
    def fit_width(
        self,
        x: Tensor,
        y: Tensor,
        widths: Iterable[float] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, float("inf")),
        accuracy_tolerance: float = 0.005,
        coverage_tolerance: float = 0.01,
        batch_size: int = 1024,
    ) -> dict[str, Any]:
        """Fit the cheapest ``width`` whose validation accuracy and coverage at ``target_risk`` stay within
        the tolerances of the full ensemble's; fall back to running every member if none does.

        Returns ``{"width", "macs_per_sample", "accuracy", "coverage", "full_accuracy", "full_coverage",
        "table"}`` (``table``: one row per candidate width) and leaves the cascade fitted with that width.
        """
        self._check_inputs(x)
        self._count_member_macs(x[:1])
        probs = self.member_probs(x, batch_size).cpu()
        y = y.cpu()
        cum_macs = self.member_macs.cumsum(0)

        def measure(width: float) -> dict[str, float]:
            lower, upper, _ = self._windows(probs, y, width)
            out = simulate_cascade(probs, lower, upper, self.score)
            cov = CoverageAtRisk(self.target_risk, validate_args=False)
            cov.update(out.probs, y)
            coverage = float(cov.compute())
            return {
                "width": width,
                "accuracy": float((out.prediction == y).double().mean()),
                "coverage": 0.0 if coverage != coverage else coverage,  # no operating point reaches the risk
                "macs_per_sample": float(cum_macs[out.members_used - 1].mean()),
            }

        full = measure(float("inf"))
        table = [measure(float(w)) for w in widths]
        ok = [
            r
            for r in table
            if r["accuracy"] >= full["accuracy"] - accuracy_tolerance - 1e-12
            and r["coverage"] >= full["coverage"] - coverage_tolerance - 1e-12
        ]
        best = min(ok, key=lambda r: (r["macs_per_sample"], r["width"])) if ok else full
        self.width = best["width"]
        self._set_windows(probs, y)
        return {**best, "full_accuracy": full["accuracy"], "full_coverage": full["coverage"], "table": table}

    # ------------------------------------------------------------------ inference
    def _check_inputs(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise ValueError(f"a cascade takes a batch tensor (B, ...); got {type(x).__name__}.")

    @torch.no_grad()
    def forward(self, x: Tensor) -> CascadeOutput:
        """Run the cascade; each stage evaluates the next member on the still-undecided samples only."""
        self._check_inputs(x)
        if not bool(self.fitted):
            raise RuntimeError(
                "this EnsembleCascade has no windows yet: call `cascade.fit(x_val, y_val)` (or `fit_width`) on "
                "validation data first."
            )
        b = x.shape[0]
        active = torch.arange(b, device=x.device)
        running: Tensor | None = None
        out_probs: Tensor | None = None
        score = torch.empty(b, device=x.device)
        used = torch.empty(b, dtype=torch.long, device=x.device)
        last = self.num_members - 1
        for k, member in enumerate(self.members):
            p = _member_probs(member, x[active] if k else x)
            running = p if running is None else running + p
            if out_probs is None:
                out_probs = torch.empty(b, p.shape[-1], device=x.device)
            mean = running / (k + 1)
            u = uncertainty(mean, self.score)
            cont = (u > self.lower[k]) & (u < self.upper[k]) if k < last else torch.zeros_like(u, dtype=torch.bool)
            done = active[~cont]
            out_probs[done], score[done], used[done] = mean[~cont], u[~cont], k + 1
            active, running = active[cont], running[cont]
            if active.numel() == 0:
                break
        assert out_probs is not None
        return CascadeOutput(out_probs, out_probs.argmax(-1), score, used)

    def extra_repr(self) -> str:
        return (
            f"members={self.num_members}, order={self.order}, exit_rule={self.exit_rule!r}, "
            f"decision={self.decision!r}, width={self.width}, score={self.score!r}"
        )


def prediction_metrics(
    probs: Tensor,
    target: Tensor,
    score: Tensor | None = None,
    ood_score: Tensor | None = None,
    risk: float = 0.05,
    n_bins: int = 15,
) -> dict[str, float]:
    """Accuracy, NLL, ECE, coverage at ``risk``, AURC and (with ``ood_score``) OOD AUROC / FPR95.

    ``score`` / ``ood_score``: uncertainties (higher = more uncertain) of the in-distribution and OOD
    samples, for the OOD metrics; default ``1 - max prob``. Selective metrics use the max probability.
    """
    probs, target = probs.detach().float().cpu(), target.cpu()
    out: dict[str, float] = {"acc": float((probs.argmax(-1) == target).double().mean())}
    for name, metric in (
        ("nll", NegativeLogLikelihood()),
        ("ece", ExpectedCalibrationError(n_bins=n_bins)),
        ("coverage_at_risk", CoverageAtRisk(risk)),
        ("aurc", AURC()),
    ):
        metric.update(probs, target)
        out[name] = float(metric.compute())
    if ood_score is not None:
        s_in = (uncertainty(probs) if score is None else score).detach().double().cpu()
        scores = torch.cat([s_in, ood_score.detach().double().cpu()])
        labels = torch.cat([torch.zeros(len(s_in), dtype=torch.long), torch.ones(len(ood_score), dtype=torch.long)])
        for name, ood_metric in (("ood_auroc", OODAUROC()), ("ood_fpr95", FPR95())):
            ood_metric.update(scores, labels)
            out[name] = float(ood_metric.compute())
    return out


@torch.no_grad()
def evaluate_cascade(
    cascade: EnsembleCascade,
    x: Tensor,
    y: Tensor,
    ood_x: Tensor | None = None,
    batch_size: int = 1024,
    risk: float = 0.05,
) -> dict[str, float]:
    """Metrics of the cascade on ``(x, y)`` (and OOD inputs ``ood_x``), with its MACs per sample
    counted by ``FlopCounterMode`` over the real (early-exiting) forward passes.

    Returns :func:`prediction_metrics` plus ``macs_per_sample``, ``members_per_sample`` (and
    ``ood_macs_per_sample`` with ``ood_x``).
    """

    def run(inputs: Tensor) -> tuple[CascadeOutput, float]:
        parts = []
        with MacCounter() as counter:
            for xb in inputs.split(batch_size):
                parts.append(cascade(xb))
        out = CascadeOutput(*(torch.cat([getattr(p, f) for p in parts]) for f in CascadeOutput._fields))
        return out, counter.macs / max(len(inputs), 1)

    out, macs = run(x)
    ood_out, ood_macs = run(ood_x) if ood_x is not None else (None, None)
    metrics = prediction_metrics(out.probs, y, out.score, None if ood_out is None else ood_out.score, risk)
    metrics["macs_per_sample"] = macs
    metrics["members_per_sample"] = float(out.members_used.double().mean())
    if ood_macs is not None:
        metrics["ood_macs_per_sample"] = ood_macs
    return metrics
