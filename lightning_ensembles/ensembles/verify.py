"""Checks that a converted ensemble is what it claims to be, on a probe input.

Every converter (:class:`~lightning_ensembles.ensembles.packed.PackedEnsemble`,
:class:`~lightning_ensembles.ensembles.batch.BatchEnsemble`,
:class:`~lightning_ensembles.ensembles.lora.LoRAEnsemble`) calls :func:`verify_ensemble` after
conversion (``verify=True``, the default). On a small probe batch it checks:

1. **the forward runs** in evaluation and in training mode; a failure becomes a
   :class:`~lightning_ensembles.ensembles.surgery.ConversionError` naming the innermost module that
   was running (found with forward hooks), with the original error;
2. **member(i) reproduces output i** (evaluation mode, max abs difference within ``atol + rtol * max|out|``);
3. **members are independent**: in training mode (``check_training=False``: evaluation mode), for every member ``j`` the gradient of a random
   projection of output ``j`` with respect to every *own* tensor of every other member ``i`` (the
   member's block of each packed / per-member parameter, ``ensemble.member_parameter_axes()``) is
   exactly zero. Training mode covers batch statistics; buffers and the RNG state are restored.

When check 3 fails, :func:`locate_coupling` finds the first operation whose output mixes members:
it records every torch operation's output (a ``TorchFunctionMode``) in one clean run and in one run
per member with only that member's own tensors perturbed; the first output in which one element
changes in two of those runs is where two members meet. The error names that operation, its call
site and the module running it, and what to do.

The result is a :class:`VerificationReport`; ``report.ran`` is ``False`` when verification was
switched off, so a skipped verification never reads as a passed one.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_ensembles.ensembles.batch import BatchEnsemble
    >>> ens = BatchEnsemble(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), num_members=3)
    >>> ens.verification.ran, ens.verification.passed
    (True, True)
    >>> BatchEnsemble(nn.Sequential(nn.Linear(4, 2)), num_members=2, verify=False).verification.ran
    False
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from .base import Ensemble
from .dataflow import clear_caches
from .surgery import ConversionError

__all__ = [
    "VerificationReport",
    "verify_ensemble",
    "evaluation_outputs",
    "make_probe",
    "module_context",
    "locate_coupling",
    "call_site",
]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # with the separator: not torch_uncertainty/
_THIS_DIR = os.path.dirname(os.path.abspath(__file__))


def _in_this_package(fname: str) -> bool:
    """Whether ``fname`` is one of the ensemble methods' or their layers' (``layers/``) source files."""
    return os.path.abspath(fname).startswith(_THIS_DIR + os.sep)


#: torch's Python wrappers that forward a call to ``__torch_function__``; the caller is above them.
_WRAPPER_FILES = tuple(os.path.join(_TORCH_DIR, f) for f in ("overrides.py", "functional.py", "_tensor.py"))
_MODE_FRAMES = {"__torch_function__", "_apply", "_learn"}
_NOT_RUN = "not verified: verify=False (pass verify=True, optionally with example_input=, to check members)"


@dataclass
class VerificationReport:
    """What the post-conversion verification checked (``ran=False``: nothing was checked)."""

    ran: bool
    passed: bool = False
    probe_shape: tuple[int, ...] | None = None
    max_member_diff: float | None = None
    checks: list[str] = field(default_factory=list)
    note: str = _NOT_RUN

    def __str__(self) -> str:
        if not self.ran:
            return self.note
        head = "verified" if self.passed else "verification FAILED"
        return f"{head} on a probe of shape {self.probe_shape}: " + "; ".join(self.checks)


def call_site(skip_internal: bool = True, skip_torch: bool = False) -> tuple[str, int, bool]:
    """``(filename, line, internal)`` of the code that called the torch function being handled.

    Meant to be called from a ``__torch_function__`` handler. Frames of torch's own Python wrappers
    are skipped (``skip_torch``: every torch frame, to name the user's line); ``internal`` is True when the caller itself lives inside torch or in this package's
    ensemble layers (their operations are implementation details, not the backbone's code).
    """
    frame: FrameType | None = sys._getframe(2)
    skip = _TORCH_DIR if skip_torch else _WRAPPER_FILES
    # Other torch-function modes (the packed channel rewrite) sit between a nested mode and the caller.
    while frame is not None and (frame.f_code.co_filename.startswith(skip) or frame.f_code.co_name in _MODE_FRAMES):
        frame = frame.f_back
    if frame is None:
        return ("<unknown>", 0, True)
    fname = frame.f_code.co_filename
    internal = skip_internal and (fname.startswith(_TORCH_DIR) or _in_this_package(fname))
    return fname, frame.f_lineno, internal


class _Context:
    def __init__(self) -> None:
        self.stack: list[tuple[str, nn.Module]] = []
        self.failed_at: tuple[str, nn.Module] | None = None


@contextlib.contextmanager
def module_context(model: nn.Module, strip: str = "") -> Iterator[_Context]:
    """Track the module stack of ``model``'s forward; ``ctx.failed_at`` is the innermost module running when
    an exception escaped (``(path, module)``)."""
    ctx = _Context()
    handles = []

    def pre(path: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            ctx.stack.append((path, module))

        return hook

    def post(path: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if ctx.stack and ctx.stack[-1][1] is module:
                ctx.stack.pop()

        return hook

    for path, module in model.named_modules(remove_duplicate=False):
        full = (
            path[len(strip) :] if strip and path.startswith(strip) else ("" if strip and path == strip[:-1] else path)
        )
        handles.append(module.register_forward_pre_hook(pre(full)))
        handles.append(module.register_forward_hook(post(full)))
    try:
        yield ctx
    except BaseException:
        if ctx.stack:
            ctx.failed_at = ctx.stack[-1]
        raise
    finally:
        for h in handles:
            h.remove()


def run_named(model: nn.Module, x: Tensor, what: str, advice: str) -> Any:
    """``model(x)``; any exception becomes a :class:`ConversionError` naming the innermost running module
    (paths inside an ensemble are given relative to its inner model, ``model._inner_prefix``)."""
    try:
        with module_context(model, getattr(model, "_inner_prefix", "")) as ctx:
            return model(x)
    except ConversionError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure is reported with the module it happened in
        path, module = ctx.failed_at or ("", model)
        raise ConversionError(
            path, f"{what} fails in {type(module).__name__}: {type(err).__name__}: {err}. {advice}"
        ) from err


def _shape_candidates(backbone: nn.Module) -> list[tuple[int, ...]]:
    """Per-example input shapes worth trying, most specific first."""
    out: list[tuple[int, ...]] = []
    cfg = getattr(backbone, "pretrained_cfg", None) or getattr(backbone, "default_cfg", None) or {}
    chans = None
    first_conv = None
    for m in backbone.modules():
        if isinstance(m, _ConvNd) and first_conv is None:
            first_conv = m
    embed = getattr(backbone, "patch_embed", None)
    img = getattr(embed, "img_size", None)
    if first_conv is not None:
        chans = first_conv.in_channels
        nd = first_conv.weight.dim() - 2
        sizes = []
        if img is not None:
            sizes.append(tuple(img) if isinstance(img, (tuple, list)) else (img,) * nd)
        sizes += [(s,) * nd for s in ((32, 64) if nd == 2 else (64, 16))]  # small first: the probe is run often
        if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == nd + 1:
            sizes.append(tuple(cfg["input_size"][1:]))
        sizes += [(s,) * nd for s in ((16, 8, 28, 224) if nd == 2 else (8, 128))]
        for s in sizes:
            if len(s) == nd and (chans, *s) not in out:
                out.append((chans, *s))
    linears = [m.in_features for m in backbone.modules() if isinstance(m, nn.Linear)]
    for shape in [(f,) for f in linears] + [(5, f) for f in linears]:  # flat features, then token sequences
        if shape not in out:
            out.append(shape)
    return out[:16]


def make_probe(
    backbone: nn.Module, example_input: Tensor | None = None, input_shape: Sequence[int] | None = None, batch: int = 2
) -> Tensor:
    """A probe batch for ``backbone``: ``example_input``, else ``randn(batch, *input_shape)``, else inferred.

    Inference tries, in order, the first convolution's channels at timm's ``patch_embed.img_size``, at
    32 and 64, at ``pretrained_cfg['input_size']`` and a few other sizes, then each ``Linear``'s
    ``in_features`` (flat, then as a sequence of 5 tokens); the first shape the backbone itself runs on
    is taken. Raises a ``ValueError`` asking for ``example_input=``
    when none works.
    """
    param = next(iter(backbone.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if example_input is not None:
        if not isinstance(example_input, Tensor):
            raise ValueError(f"`example_input` must be a tensor batch (B, ...), got {type(example_input).__name__}.")
        return example_input.detach().to(device)
    gen = torch.Generator().manual_seed(0)
    if input_shape is not None:
        return torch.randn(batch, *input_shape, generator=gen, dtype=dtype).to(device)
    tried = []
    training = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        for shape in _shape_candidates(backbone):
            x = torch.randn(batch, *shape, generator=gen, dtype=dtype).to(device)
            try:
                with torch.no_grad():
                    out = backbone(x)
                if isinstance(out, Tensor):
                    return x
                tried.append(f"{shape}: returns {type(out).__name__}, not a tensor")
            except Exception as err:  # noqa: BLE001 - a probe search: the next shape may work
                tried.append(f"{shape}: {type(err).__name__}: {str(err)[:80]}")
    finally:
        for m, t in training.items():
            m.training = t
        clear_caches(backbone)
    raise ValueError(
        "cannot form a probe input to trace and verify the conversion: the backbone runs on none of the inferred "
        f"shapes ({'; '.join(tried) or 'no Linear/Conv layer to infer from'}). Pass example_input=torch.randn(2, ...) "
        "(or input_shape=(C, H, W)); verify=False skips verification (then give first_layer/last_layer for Packed)."
    )


@contextlib.contextmanager
def _preserved(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore buffers, train/eval flags and the RNG state after a probe run."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
        for m, t in modes.items():
            m.training = t
        clear_caches(model)


def _own_blocks(ens: Ensemble) -> list[tuple[str, nn.Parameter, int]]:
    params = dict(ens.named_parameters())
    return [(n, params[n], axis) for n, axis in ens.member_parameter_axes().items() if n in params]


def _blocks(t: Tensor, axis: int, m: int) -> Tensor:
    return t.unflatten(axis, (m, -1)).movedim(axis, 0)


_ADVICE = (
    "Exclude it from the conversion (keep it shared), or convert it by hand so that it acts on each member's "
    "channels separately (e.g. on x.unflatten(1, (M, -1)) for channel-first tensors)."
)


def evaluation_outputs(ens: Ensemble, probe: Tensor, advice: str = "") -> Tensor:
    """``ens(probe)``, which must be member outputs ``(M, B, ...)``; a :class:`ConversionError` otherwise.

    A failing forward names the module it failed in (:func:`run_named`).
    """
    out = run_named(ens, probe, "the converted ensemble's forward (evaluation mode)", advice)
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != ens.num_members:
        raise ConversionError(
            "",
            f"the converted ensemble returned {getattr(out, 'shape', type(out).__name__)}, not "
            f"member outputs (M={ens.num_members}, B, ...). Does the backbone return one tensor?",
        )
    return out


def verify_ensemble(
    ens: Ensemble,
    probe: Tensor,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    advice: str = _ADVICE,
    check_training: bool = True,
) -> VerificationReport:
    """Run the checks of this module on ``probe``; raise :class:`ConversionError` on the first failure.

    ``ens`` needs ``num_members``, ``member(i)`` and ``member_parameter_axes()`` (own tensor name ->
    axis holding the M member blocks).
    """
    m = ens.num_members
    device = probe.device
    report = VerificationReport(ran=True, probe_shape=tuple(probe.shape))
    with _preserved(ens, device):
        ens.eval()
        with torch.no_grad():
            out = evaluation_outputs(ens, probe, advice)
        own = _own_blocks(ens)
        if not own:
            raise ConversionError("", "the ensemble reports no per-member tensors; independence cannot be checked.")
        trainable = [(n, p, a) for n, p, a in own if p.requires_grad]
        # Training mode covers batch statistics; evaluation mode differs only in running statistics and
        # dropout, which act per channel / per element. One mode keeps the probe cheap.
        modes = [("training", True)] if check_training else [("evaluation", False)]
        for mode_name, train in modes:
            ens.train(train)
            with torch.enable_grad():
                out = run_named(ens, probe, f"the converted ensemble's forward ({mode_name} mode)", advice)
                if not out.requires_grad:
                    raise ConversionError("", "the ensemble's output does not depend on any trainable tensor.")
                gen = torch.Generator().manual_seed(1)
                coupled: list[tuple[int, int, str]] = []
                for j in range(m):
                    proj = torch.randn(out[j].shape, generator=gen).to(out.device, out.dtype)
                    grads = torch.autograd.grad(
                        (out[j] * proj).sum(), [p for _, p, _ in trainable], retain_graph=j < m - 1, allow_unused=True
                    )
                    for (name, _, axis), g in zip(trainable, grads):
                        if g is None:
                            continue
                        gb = _blocks(g, axis, m)
                        for i in range(m):
                            if i != j and bool(gb[i].ne(0).any()):
                                coupled.append((i, j, name))
                                break
            if coupled:
                i, j, name = coupled[0]
                where = locate_coupling(ens, probe)
                raise ConversionError(
                    where[0] if where else "",
                    (
                        f"members are not independent ({mode_name} mode): output {j} depends on member {i}'s block of "
                        f"{name!r}"
                        + (f"; the first operation mixing members is {where[1]}" if where else "")
                        + f". {advice}"
                    ),
                )
            report.checks.append(
                f"members independent in {mode_name} mode (gradient of each output on every other "
                f"member's own tensors is exactly zero; {len(trainable)} tensors)"
            )
        ens.eval()
        with torch.no_grad():
            out = run_named(ens, probe, "the converted ensemble's forward (evaluation mode)", advice)
        scale = float(out.abs().max()) if out.numel() else 0.0
        tol = atol + rtol * scale
        worst = 0.0
        for i in range(m):
            member = ens.member(i).eval()
            with torch.no_grad():
                y = run_named(
                    member,
                    probe,
                    f"member({i})",
                    "member() rebuilds the member from its block; report this as a bug with the model.",
                )
            if not isinstance(y, Tensor) or y.shape != out[i].shape:
                raise ConversionError(
                    "",
                    f"member({i}) returns shape {getattr(y, 'shape', None)}, the ensemble's "
                    f"output {i} has shape {tuple(out[i].shape)}.",
                )
            finite = torch.isfinite(out[i]) & torch.isfinite(y)
            diff = float((y - out[i])[finite].abs().max()) if finite.any() else 0.0
            if not torch.equal(torch.isfinite(out[i]), torch.isfinite(y)) or diff > tol:
                where = locate_coupling(ens, probe)
                nonfinite = "" if diff > tol else ", and one of them has inf/NaN where the other has not"
                raise ConversionError(
                    where[0] if where else "",
                    (
                        f"member({i}) does not reproduce the ensemble's output {i} on the probe (max abs difference "
                        f"{diff:.3g} > tolerance {tol:.3g}{nonfinite}): the ensemble's computation and the member's own computation "
                        "disagree"
                        + (f"; the first operation mixing members is {where[1]}" if where else "")
                        + f". {advice}"
                    ),
                )
            worst = max(worst, diff)
        report.max_member_diff = worst
        report.checks.append(f"member(i) reproduces output i for all {m} members (max abs diff {worst:.2g})")

    report.passed = True
    return report


class _Recorder(TorchFunctionMode):
    def __init__(self, ctx: _Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.records: list[tuple[str, str, Tensor, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if name in ("__get__", "__set__", "size", "dim", "numel", "__len__"):
            return out
        tensors = (
            [out]
            if isinstance(out, Tensor)
            else [t for t in out if isinstance(t, Tensor)]
            if isinstance(out, (tuple, list))
            else []
        )
        if tensors:
            fname, line, _ = call_site(skip_internal=False, skip_torch=True)
            ours = _in_this_package(fname)  # inside the converters' own layers
            path, module = self.ctx.stack[-1] if self.ctx.stack else ("", None)
            where = f"{name} at {os.path.basename(fname)}:{line} in module {path or '<root>'!r}" + (
                f" ({type(module).__name__})" if module is not None else ""
            )
            for t in tensors:
                if t.is_floating_point() or t.is_complex():
                    self.records.append((path, where, t.detach().clone(), ours))
        return out


def _misordered(owner: Tensor) -> bool:
    """Whether member ownership (-1: no member) decreases along some axis: a packed tensor keeps each member's
    elements in one contiguous block per axis, in member order (channels, batch rows or a member axis)."""
    for axis in range(owner.dim()):
        if owner.shape[axis] < 2:
            continue
        a, b = owner.narrow(axis, 0, owner.shape[axis] - 1), owner.narrow(axis, 1, owner.shape[axis] - 1)
        if bool(((a >= 0) & (b >= 0) & (b < a)).any()):
            return True
    return False


def locate_coupling(ens: Ensemble, probe: Tensor, scale: float = 0.5) -> tuple[str, str] | None:
    """``(module_path, description)`` of the first operation whose output mixes two members, or ``None``.

    Perturbs each member's own tensors in turn (evaluation mode) and compares every recorded operation
    output with a clean run: an element that changes for two different members is where they meet; an
    output whose elements of different members are interleaved (a channel shuffle) is where they will.
    """
    m = ens.num_members
    own = _own_blocks(ens)
    runs = []
    with _preserved(ens, probe.device):
        ens.eval()
        saved = {n: p.detach().clone() for n, p, _ in own}
        for member in [None, *range(m)]:
            with torch.no_grad():
                if member is not None:
                    gen = torch.Generator().manual_seed(member + 7)
                    for n, p, axis in own:
                        p.copy_(saved[n])
                        block = _blocks(p, axis, m)[member]
                        noise = torch.randn(block.shape, generator=gen).to(p.device, p.dtype)
                        block.add_(noise * scale * (block.abs().mean() + 1e-2))
                try:
                    with module_context(ens, getattr(ens, "_inner_prefix", "")) as ctx, _Recorder(ctx) as rec:
                        ens(probe)
                except Exception:  # noqa: BLE001 - localisation is best effort; the caller reports the failure
                    return None
                runs.append(rec.records)
        with torch.no_grad():
            for n, p, _ in own:
                p.copy_(saved[n])
    base = runs[0]
    if any(len(r) != len(base) for r in runs):
        return None
    for k, (path, where, t0, ours) in enumerate(base):
        changed = torch.zeros(t0.shape, dtype=torch.int32, device=t0.device)
        owner = torch.full(t0.shape, -1, dtype=torch.int64, device=t0.device)
        for i, r in enumerate(runs[1:]):
            t = r[k][2]
            if t.shape != t0.shape:
                return None
            hit = (t != t0) & ~(torch.isnan(t) & torch.isnan(t0))
            changed += hit.to(torch.int32)
            owner[hit] = i
        if bool((changed >= 2).any()):  # one element depends on two members
            return path, where
        # Members' elements interleaved: the next per-member layer will mix them. (The converters' own layers
        # interleave on purpose, e.g. a fused q/k/v output reordered for M * h heads.)
        if not ours and _misordered(owner):
            return path, where + " (it interleaves the members' elements)"
    return None
    for k, (path, where, t0, ours) in enumerate(base):
        changed = torch.zeros(t0.shape, dtype=torch.int32, device=t0.device)
        for r in runs[1:]:
            t = r[k][2]
            if t.shape != t0.shape:
                return None
            changed += ((t != t0) & ~(torch.isnan(t) & torch.isnan(t0))).to(torch.int32)
        if bool((changed >= 2).any()):
            return path, where
    return None
