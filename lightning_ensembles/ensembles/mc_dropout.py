"""MC-Dropout (Gal & Ghahramani, 2016) for any backbone: dropout kept on at evaluation, samples as members.

Every dropout the backbone runs is caught while the ensemble evaluates: ``nn.Dropout*`` modules *and*
functional calls (``F.dropout``, ``F.dropout2d``, ``torch.dropout``, ``F.alpha_dropout`` ...; a
:class:`torch.overrides.TorchFunctionMode` sees them whatever ``training`` flag the backbone passes,
which is how calls that a module-swapping wrapper misses are handled, torch-uncertainty's issue #152).
The M samples run as one batched pass: the batch is repeated member-major, ``(M * B, ...)``, and
member ``i`` drops with its own mask.

Masks at evaluation are *seeded*: member ``i``'s mask at the ``k``-th dropout call of a forward is a
counter-based hash of ``(seed_i, k, element)``, drawn once per member and shared by the member's rows.
Member ``i`` is therefore one fixed thinned network (what Gal's weight-sampling view calls one weight
sample): ``member(i)(x) == ensemble(x)[i]`` for any ``x``, on any device and batch size, and the
seeds are a buffer (they go with the checkpoint). :meth:`MCDropout.reseed` draws new members.
In training dropout is ordinary (the global RNG, a fresh mask per example and step).

Refused with :class:`ConversionError` naming the module: ``nn.MultiheadAttention`` and RNNs with
``dropout > 0`` (their dropout runs inside fused kernels only in training, so it cannot be kept on).
timm ``Attention`` blocks with attention dropout are switched to their unfused path (same maths),
whose ``attn_drop`` module is then caught like any other dropout. Dropout written as
``if self.training: ...`` cannot be seen and stays off; stochastic depth (``DropPath``) is not dropout
and stays off too.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._members_check import verify_shared_members
from .base import Ensemble
from .registry import register_method
from .surgery import ConversionError, match_paths
from .verify import VerificationReport

__all__ = ["MCDropout", "MCDropoutMember", "seeded_uniform"]

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_M32 = 0xFFFFFFFF
# func -> (is_feature_dropout, is_alpha, in_place, name of the training argument)
_FUNCS: dict[Any, tuple[bool, bool, bool, str]] = {
    F.dropout: (False, False, False, "training"),
    F.dropout1d: (True, False, False, "training"),
    F.dropout2d: (True, False, False, "training"),
    F.dropout3d: (True, False, False, "training"),
    F.alpha_dropout: (False, True, False, "training"),
    F.feature_alpha_dropout: (True, True, False, "training"),
    torch.dropout: (False, False, False, "train"),
    torch.dropout_: (False, False, True, "train"),
    torch.feature_dropout: (True, False, False, "train"),
    torch.feature_dropout_: (True, False, True, "train"),
    torch.alpha_dropout: (False, True, False, "train"),
    torch.alpha_dropout_: (False, True, True, "train"),
    torch.feature_alpha_dropout: (True, True, False, "train"),
    torch.feature_alpha_dropout_: (True, True, True, "train"),
}
_ADVICE = "Pass p=0.1 with insert_before=[...] module paths, or verify=False to skip this check."
_SELU_ALPHA = 1.7580993408473766  # -SELU's negative saturation value, as in ATen's alpha dropout


def _mix32(h: Tensor) -> Tensor:
    # "lowbias32" integer hash (C. Wellons) on int64 tensors holding 32-bit values; products wrap in
    # two's complement, and the mask keeps the exact low 32 bits.
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def seeded_uniform(seeds: Tensor, call: int, numel: int) -> Tensor:
    """Uniform numbers in [0, 1) of shape ``(len(seeds), numel)``, a pure function of ``(seed, call, index)``.

    Counter-based (no generator state), so a member's numbers do not depend on the other members, the
    device or the batch.

    Example:
        >>> u = seeded_uniform(torch.tensor([1, 2]), call=0, numel=4)
        >>> u.shape, bool((u >= 0).all() and (u < 1).all())
        (torch.Size([2, 4]), True)
        >>> torch.equal(u[1], seeded_uniform(torch.tensor([2]), call=0, numel=4)[0])
        True
    """
    key = _mix32(seeds.long() * 0x9E3779B9 + _mix32(torch.full_like(seeds.long(), call + 0x632BE5AB)))
    idx = torch.arange(numel, device=seeds.device, dtype=torch.long)
    h = _mix32(key[:, None] ^ _mix32(idx * 0x85EBCA77 + 0x27D4EB2F)[None, :])
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _call_args(func: Any, args: tuple, kwargs: dict, train_name: str) -> tuple[Tensor, float, bool]:
    x = args[0] if args else kwargs["input"]
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    inplace = bool(args[3]) if len(args) > 3 else bool(kwargs.get("inplace", False))
    return x, float(p), inplace


class _Sampler(TorchFunctionMode):
    """Catches every dropout call of one forward: seeded per-member masks in evaluation; ``p`` override."""

    def __init__(self, seeds: Tensor | None, rows: int, p: float | None) -> None:
        super().__init__()
        self.seeds, self.rows, self.p = seeds, rows, p
        self.calls = 0
        self.active = 0  # calls with p > 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        spec = _FUNCS.get(func)
        if spec is None:
            if func is F.scaled_dot_product_attention and self.seeds is not None:
                drop = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
                if drop:
                    raise ConversionError(
                        "",
                        "a fused attention call with dropout_p > 0 ran during an MC-Dropout "
                        "evaluation; its mask cannot be seeded per member. Disable that "
                        "attention dropout or use an unfused attention module.",
                    )
            return func(*args, **kwargs)
        feature, alpha, inplace_fn, train_name = spec
        x, p, inplace = _call_args(func, args, kwargs, train_name)
        p = self.p if self.p is not None else p
        self.calls += 1
        self.active += p > 0
        if self.seeds is None:  # training: ordinary dropout, only the rate overridden
            if len(args) > 1:
                args = (args[0], p, *args[2:])
            else:
                kwargs = {**kwargs, "p": p}
            return func(*args, **kwargs)
        return self._masked(self.seeds, x, p, feature, alpha, inplace or inplace_fn)

    def _masked(self, seeds: Tensor, x: Tensor, p: float, feature: bool, alpha: bool, inplace: bool) -> Tensor:
        m = seeds.shape[0]
        if x.dim() == 0 or x.shape[0] % self.rows:
            raise ConversionError(
                "",
                f"a dropout input of shape {tuple(x.shape)} does not have the batch "
                f"({self.rows} rows: {m} samples x batch) on axis 0; MC-Dropout needs "
                "batch-first activations.",
            )
        call = self.calls - 1
        per_row = x.shape[1:]
        mask_shape = (per_row[0],) + (1,) * (len(per_row) - 1) if feature and per_row else per_row
        numel = 1
        for s in mask_shape:
            numel *= s
        keep = (seeded_uniform(seeds, call, numel) >= p).to(x.dtype).view(m, 1, *mask_shape)
        xm = x.view(m, -1, *per_row)
        if alpha:
            # ATen's alpha dropout: dropped units go to SELU's saturation value, then an affine map
            # restores zero mean and unit variance.
            a = ((_SELU_ALPHA**2 * p + 1) * (1 - p)) ** -0.5 if p < 1 else 0.0
            shift = (keep - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
            out = xm * (keep * a) + shift
        else:
            out = xm * (keep / (1 - p)) if p < 1 else xm * 0
        if inplace:
            return x.copy_(out.view_as(x))
        return out.view_as(x)


class _DropoutBefore:
    """Forward pre-hook adding ``F.dropout(p)`` before a module (weights and state-dict keys unchanged)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], Tensor):
            return args
        return (F.dropout(args[0], self.p, module.training), *args[1:])


def _prepare(
    backbone: nn.Module, p: float | None, insert_before: list[str] | None
) -> tuple[nn.Module, list[str], list[str]]:
    """Copy ``backbone``; refuse what cannot be sampled; insert dropout. Returns (model, dropout paths, inserted)."""
    for path, mod in backbone.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and mod.dropout > 0:
            raise ConversionError(
                path,
                f"nn.MultiheadAttention(dropout={mod.dropout}) drops attention weights inside "
                "a fused kernel, only in training, so MC-Dropout cannot keep it on. Build it with "
                "dropout=0 (MC-Dropout's other dropouts still sample).",
            )
        if isinstance(mod, nn.RNNBase) and mod.dropout > 0:
            raise ConversionError(
                path,
                f"{type(mod).__name__}(dropout={mod.dropout}) drops between layers inside the "
                "RNN kernel, only in training. Build it with dropout=0 and add nn.Dropout modules.",
            )
    model = copy.deepcopy(backbone)
    for mod in model.modules():
        drop = getattr(mod, "attn_drop", None)
        if getattr(mod, "fused_attn", False) and isinstance(drop, nn.Dropout) and (drop.p > 0 or p):
            cast(Any, mod).fused_attn = False  # timm: the unfused path calls attn_drop, which MC-Dropout catches
    inserted: list[str] = []
    if insert_before:
        if p is None or p <= 0:
            raise ValueError("`insert_before` needs a dropout rate: pass p=0.1 (or another value in (0, 1)).")
        names = [n for n, _ in model.named_modules() if n]
        inserted = match_paths(names, insert_before, "insert_before")
        for n in inserted:
            model.get_submodule(n).register_forward_pre_hook(_DropoutBefore(p))
    drops = [n for n, m in model.named_modules() if isinstance(m, _DROPOUT_MODULES)]
    if p is None and not inserted and drops:
        rates = {n: model.get_submodule(n).p for n in drops}
        if all(r == 0 for r in rates.values()):
            raise ConversionError(
                drops[0],
                f"every dropout layer has p=0 ({len(drops)} layers; timm's default "
                "drop_rate is 0), so all samples would be equal. Pass p=0.1, or build the "
                "backbone with a dropout rate.",
            )
    return model, drops, inserted


def _draw_seeds(num: int, seed: int | None) -> Tensor:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(0, 2**31 - 1, (num,), generator=gen, dtype=torch.long)


def _run(model: nn.Module, x: Tensor, seeds: Tensor | None, samples: int, p: float | None) -> Tensor:
    """``(samples, B, ...)``: the backbone on ``x`` repeated member-major, under the dropout sampler."""
    b = x.shape[0]
    xs = x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * b, *x.shape[1:])
    if seeds is None and p is None:  # training without a rate override: plain dropout, no interception
        return model(xs).unflatten(0, (samples, b))
    sampler = _Sampler(seeds, samples * b, p)
    with sampler:
        out = model(xs)
    if seeds is not None and sampler.active == 0:
        what = "no dropout ran" if sampler.calls == 0 else f"all {sampler.calls} dropout calls had p=0"
        raise ConversionError(
            "",
            f"{what} in the backbone's forward, so every sample is the same model. Pass "
            "p=0.1 (with `insert_before=[...]` module paths if the backbone has no dropout).",
        )
    return out.unflatten(0, (samples, b))


class MCDropoutMember(nn.Module):
    """One fixed MC-Dropout sample of a backbone (what :meth:`MCDropout.member` returns): ``(B, ...) -> (B, ...)``.

    Args:
        model: the backbone, prepared by :class:`MCDropout` (dropout calls caught).
        seed: the sample's seed (its dropout masks).
        p: the dropout rate override, or ``None`` for the backbone's own rates.
    """

    seeds: Tensor  # registered buffer, (1,)

    def __init__(self, model: nn.Module, seed: Tensor, p: float | None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("seeds", seed.reshape(1).clone())
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return _run(self.model, x, self.seeds, 1, self.p)[0]


@register_method("mc_dropout")
class MCDropout(Ensemble):
    """MC-Dropout of any backbone: ``num_members`` dropout samples run as one batched pass.

    Args:
        backbone: any ``nn.Module`` (timm included); its weights are kept (a copy is converted).
        num_members: number of samples M (``num_samples`` is an alias property).
        p: ``None`` keeps the backbone's own rates; a float overrides the rate of every dropout the
            backbone runs (modules and functional calls) and is the rate of inserted dropout.
        insert_before: module-path patterns (``fnmatch``, e.g. ``["net.3", "head.*"]``) before which
            dropout with rate ``p`` is inserted, for backbones without dropout. Inserted as forward
            pre-hooks, so parameter names and state-dict keys stay the backbone's.
        train_samples: samples per example in training. ``None``: all M (forward always returns
            ``(M, B, ...)``, so diversity terms, the ``Ensembling`` callback and every metric see M
            members; M times the cost of one model). ``1``: classic MC-Dropout training at the cost of
            one model (``forward`` returns ``(1, B, ...)``, :meth:`member_targets` matches it).
        seed: seed of the member seeds (``None``: drawn from torch's global generator).
        verify: after conversion, run the ensemble and every ``member(i)`` on a probe batch (evaluation):
            a backbone whose forward runs no dropout is refused here, and ``member(i)`` must reproduce
            output ``i``. The probe is ``example_input``, else ``randn(2, *input_shape)``, else inferred
            from the backbone (:func:`~lightning_ensembles.ensembles.verify.make_probe`).
            ``verification`` holds the report.
        backbone_kwargs: arguments building ``backbone`` when it is a name (see ``build_backbone``).

    Example:
        >>> import torch
        >>> from lightning_ensembles.backbones import MLP
        >>> ens = MCDropout(MLP(4, 3, hidden=(16,), dropout=0.5), num_members=5).eval()
        >>> out = ens(torch.randn(2, 4))
        >>> out.shape
        torch.Size([5, 2, 3])
        >>> torch.allclose(ens.member(3)(torch.ones(1, 4)), ens(torch.ones(1, 4))[3])
        True
    """

    seeds: Tensor  # registered buffer, (M,): member i's dropout masks in evaluation

    def __init__(
        self,
        backbone: nn.Module | str,
        num_members: int = 8,
        p: float | None = None,
        insert_before: list[str] | None = None,
        train_samples: int | None = None,
        seed: int | None = None,
        verify: bool = True,
        example_input: Tensor | None = None,
        input_shape: list[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        backbone = self.build_backbone(backbone, backbone_kwargs)
        if p is not None and not (isinstance(p, (int, float)) and 0 <= p < 1):
            raise ValueError(f"`p` must be None or a rate in [0, 1), got {p!r}.")
        if train_samples is not None and not (isinstance(train_samples, int) and 1 <= train_samples <= num_members):
            raise ValueError(
                f"`train_samples` must be None or an integer in [1, num_members={num_members}], got {train_samples!r}."
            )
        self.p = None if p is None else float(p)
        self.train_samples = train_samples
        self.model, self.dropout_layers, self.inserted = _prepare(backbone, self.p, list(insert_before or []))
        self.register_buffer("seeds", _draw_seeds(num_members, seed))
        self.train(backbone.training)
        self.verification = (
            verify_shared_members(self, backbone, example_input, input_shape, _ADVICE)
            if verify
            else VerificationReport(ran=False)
        )

    _inner_prefix = "model."

    @property
    def num_samples(self) -> int:
        """Alias of ``num_members``."""
        return self.num_members

    @torch.no_grad()
    def reseed(self, seed: int | None = None) -> None:
        """Draw new member seeds (new dropout masks for every member)."""
        self.seeds.copy_(_draw_seeds(self.num_members, seed).to(self.seeds.device))

    def _samples(self) -> int:
        return self.train_samples or self.num_members if self.training else self.num_members

    def forward(self, x: Tensor) -> Tensor:
        """``(M, B, ...)`` samples (``(train_samples, B, ...)`` in training when ``train_samples`` is set)."""
        if self.training:
            return _run(self.model, x, None, self._samples(), self.p)
        return _run(self.model, x, self.seeds, self.num_members, self.p)

    def member_targets(self, target: Tensor) -> Tensor:
        """Targets repeated to match :meth:`forward` (``train_samples`` rows in training)."""
        return target.unsqueeze(0).expand(self._samples(), *target.shape)

    def member(self, index: int) -> nn.Module:
        """Sample ``index`` as a standalone module (the backbone with that sample's fixed masks, in eval)."""
        index = self._check_index(index)
        return MCDropoutMember(copy.deepcopy(self.model), self.seeds[index], self.p).eval()

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, p={self.p}, dropout_layers={len(self.dropout_layers)}, "
            f"inserted={self.inserted}, train_samples={self.train_samples}"
        )
