"""Export ensembles (and single members) for deployment: ``torch.export`` and ONNX, checked against eager.

Every helper puts the model in eval mode, traces it with ``torch.export.export`` (ONNX through
``torch.onnx.export(dynamo=True)``), runs the result on the example input (and, when the traced
batch axis is dynamic, on a batch of another size) and compares it with the eager model's outputs.
A mismatch raises :class:`ExportError`; nothing is returned that computes something else.

The exported graph is plain: a :class:`~lightning_ensembles.DeepEnsemble` runs its members one after
another on views of the stacked weights (no ``vmap`` operators, no timing), MC-Dropout's seeded masks
are computed in the graph from the seeds buffer, so the exported model gives the same M samples as
the eager one. ``member(i)`` of every method exports as an ordinary model (docs/export.md has the table).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from .ensembles.base import Ensemble

__all__ = ["ExportError", "export_ensemble", "export_member", "export_onnx"]


class ExportError(RuntimeError):
    """An ensemble (or member) could not be exported, or its export does not reproduce the eager outputs."""


def _name(model: nn.Module) -> str:
    return type(model).__name__


def _dynamic_shapes(x: Tensor, dynamic_batch: bool) -> tuple | None:
    if not dynamic_batch:
        return None
    # AUTO: dynamic where the model allows it, specialised (not an error) where it does not (e.g. a
    # model that reshapes with a constant batch); `_batch_is_dynamic` tells which one happened.
    return ({0: torch.export.Dim.AUTO},)


def _batch_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            return val is not None and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt)
    return False


def _other_batch(x: Tensor) -> Tensor:
    """The example input with one more row (repeats the first), to check a dynamic batch axis."""
    return torch.cat([x, x[:1]], dim=0)


def _compare(name: str, what: str, got: Any, want: Tensor, atol: float, rtol: float) -> None:
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(want.shape):
        raise ExportError(f"{name}: {what} has shape {tuple(got.shape)}, eager has {tuple(want.shape)}.")
    got = got.to(want.device, want.dtype)
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        err = (got - want).abs().max().item()
        raise ExportError(
            f"{name}: {what} differs from the eager model by up to {err:.3g} (atol={atol}, rtol={rtol}). "
            "Raise atol/rtol if this is rounding, or report the model."
        )


def _prepare(model: nn.Module, example_input: Tensor) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module to export, got {type(model).__name__}.")
    if not isinstance(example_input, Tensor):
        raise ValueError(f"`example_input` must be one batch tensor (B, ...), got {type(example_input).__name__}.")
    return model.eval()


def _export(model: nn.Module, x: Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(x, dynamic_batch))
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(
            f"torch.export could not trace {_name(model)}: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from err


def _check_program(
    name: str, model: nn.Module, program: torch.export.ExportedProgram, x: Tensor, atol: float, rtol: float
) -> None:
    inputs = [x, _other_batch(x)] if _batch_is_dynamic(program) else [x]
    runnable = program.module()
    with torch.no_grad():
        for i, xi in enumerate(inputs):
            what = "the exported program" + (f" at batch {xi.shape[0]}" if i else "")
            _compare(name, what, runnable(xi), model(xi), atol, rtol)


def export_ensemble(
    ensemble: nn.Module,
    example_input: Tensor,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> torch.export.ExportedProgram:
    """``torch.export`` an ensemble (eval mode) and check the program's ``(M, B, ...)`` outputs against eager.

    Args:
        ensemble: any :class:`~lightning_ensembles.ensembles.base.Ensemble` (or any ``nn.Module``).
        example_input: one batch ``(B, ...)``.
        dynamic_batch: trace the batch axis as dynamic where the model allows it (else specialised).
        check: compare the exported program with the eager model on ``example_input`` (and on a batch
            of another size when the batch axis is dynamic); raise :class:`ExportError` on a mismatch.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble("mlp", num_members=2, backbone_kwargs={"in_features": 4, "out_features": 3})
        >>> program = export_ensemble(ens, torch.randn(5, 4))
        >>> program.module()(torch.randn(7, 4)).shape
        torch.Size([2, 7, 3])
    """
    model = _prepare(ensemble, example_input)
    program = _export(model, example_input, dynamic_batch)
    if check:
        _check_program(_name(model), model, program, example_input, atol, rtol)
    return program


def export_member(
    ensemble: Ensemble,
    index: int,
    example_input: Tensor,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> torch.export.ExportedProgram:
    """``torch.export`` member ``index`` alone as a plain model ``(B, ...) -> (B, ...)``.

    Checked against the eager member and against output ``index`` of the eager ensemble.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble("mlp", num_members=2, backbone_kwargs={"in_features": 4, "out_features": 3})
        >>> export_member(ens, 1, torch.randn(5, 4)).module()(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """
    if not isinstance(ensemble, Ensemble):
        raise ValueError(f"`ensemble` must be an Ensemble with member(i), got {type(ensemble).__name__}.")
    model = _prepare(ensemble, example_input)
    member = _prepare(ensemble.member(index), example_input)
    name = f"{_name(model)}.member({index})"
    program = _export(member, example_input, dynamic_batch)
    if check:
        _check_program(name, member, program, example_input, atol, rtol)
        with torch.no_grad():
            _compare(
                name, "the exported member", program.module()(example_input), model(example_input)[index], atol, rtol
            )
    return program


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike | None = None,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> Any:
    """ONNX through ``torch.onnx.export(dynamo=True)``, checked with onnxruntime against eager.

    ``model`` is an ensemble (output ``(M, B, ...)``) or a member (``ensemble.member(i)``). Returns the
    ``torch.onnx.ONNXProgram``; ``path`` also saves it. Needs the ``export`` extra
    (``pip install lightning-ensembles[export]``: onnx, onnxscript, onnxruntime).

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble("mlp", num_members=2, backbone_kwargs={"in_features": 4, "out_features": 3})
        >>> onnx_program = export_onnx(ens, torch.randn(5, 4))  # doctest: +SKIP
    """
    from ._optional import require

    require("onnxscript", "export", "ONNX export")
    model = _prepare(model, example_input)
    name = _name(model)
    program = _export(model, example_input, dynamic_batch)  # same tracing (and errors) as export_ensemble
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    except Exception as err:
        raise ExportError(
            f"torch.onnx could not convert {name}: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from err
    if onnx_program is None:  # only the legacy exporter (dynamo=False) returns None
        raise ExportError(f"torch.onnx returned no ONNX program for {name}.")
    if path is not None:
        onnx_program.save(os.fspath(path))
    if check:
        ort = require("onnxruntime", "export", "checking an ONNX export")

        session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed_name = session.get_inputs()[0].name
        inputs = [example_input, _other_batch(example_input)] if _batch_is_dynamic(program) else [example_input]
        with torch.no_grad():
            for i, xi in enumerate(inputs):
                (got,) = session.run(None, {feed_name: xi.detach().cpu().numpy()})[:1]
                what = "the ONNX model (onnxruntime)" + (f" at batch {xi.shape[0]}" if i else "")
                _compare(name, what, torch.from_numpy(got), model(xi), atol, rtol)
    return onnx_program
