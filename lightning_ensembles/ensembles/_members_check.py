"""Post-conversion check for ensembles whose members share their weights (MC-Dropout, MIMO, Masksembles).

:func:`~lightning_ensembles.ensembles.verify.verify_ensemble` proves independence through each member's
own parameter block; these families have none (members differ by masks, seeds or input slots), so they
check what they can on a probe batch: the forward runs (a failure names the module it happened in),
returns ``(M, B, ...)``, and ``member(i)`` reproduces output ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Ensemble
from .surgery import ConversionError
from .verify import VerificationReport, evaluation_outputs, make_probe, run_named

__all__ = ["verify_shared_members"]


def verify_shared_members(
    ens: Ensemble,
    backbone: nn.Module,
    example_input: Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    advice: str = "",
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> VerificationReport:
    """Run ``ens`` and every ``ens.member(i)`` on a probe (evaluation mode); raise :class:`ConversionError` on a mismatch."""
    probe = make_probe(backbone, example_input, input_shape)
    m = ens.num_members
    report = VerificationReport(ran=True, probe_shape=tuple(probe.shape))
    modes = {mod: mod.training for mod in ens.modules()}
    try:
        ens.eval()
        with torch.no_grad():
            out = evaluation_outputs(ens, probe, advice)
            tol = atol + rtol * (float(out.abs().max()) if out.numel() else 0.0)
            worst = 0.0
            for i in range(m):
                y = run_named(ens.member(i).eval(), probe, f"member({i})", "report this as a bug with the model.")
                if not isinstance(y, Tensor) or y.shape != out[i].shape:
                    raise ConversionError(
                        "",
                        f"member({i}) returns shape {getattr(y, 'shape', None)}, the ensemble's "
                        f"output {i} has shape {tuple(out[i].shape)}.",
                    )
                diff = float((y - out[i]).abs().max()) if y.numel() else 0.0
                if not diff <= tol:
                    raise ConversionError(
                        "",
                        f"member({i}) does not reproduce the ensemble's output {i} on the probe "
                        f"(max abs difference {diff:.3g} > {tol:.3g}). {advice}",
                    )
                worst = max(worst, diff)
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    report.max_member_diff = worst
    report.checks.append(f"forward runs; member(i) reproduces output i for all {m} members (max abs diff {worst:.2g})")
    report.passed = True
    return report
