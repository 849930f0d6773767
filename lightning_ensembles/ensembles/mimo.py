"""MIMO (Havasi et al., ICLR 2021): M sub-networks inside one backbone, trained and run in one pass.

The backbone's input layer (first ``Linear``/``Conv``) is widened to take M inputs concatenated on its
channel axis, and its output layer (last ``Linear``/``Conv``) to give M heads. Everything between is
shared and runs once per example, so M members cost about one model.

Inside the converted network the batch is member-major ``(M * B, ...)`` up to the input layer (so
per-example preprocessing such as ``Flatten`` runs per member), ``(B, ...)`` between the two layers,
and member-major again after the output layer.

Training (the paper's batching, as in uncertainty-baselines): the batch is tiled ``batch_repetition``
times and shuffled; a fraction ``1 - input_repetition`` of the slots is shuffled again independently
per member, the rest is shared, so with probability ``input_repetition`` (the paper's ``rho``) the
members see the same example. :meth:`MIMO.forward` puts each member's outputs back in batch order, so
output ``[m, t]`` predicts target ``t % B``: targets are the batch's, tiled (:meth:`member_targets`),
and the per-member losses are the paper's.
Evaluation: the same input in every slot, one forward pass.

Initialisation keeps the backbone: ``init="copy"`` gives every input block ``W / M`` and every head the
backbone's output layer, so before training each member computes exactly the backbone on a repeated
input; ``init="reinit"`` draws the widened layers with PyTorch's default initialiser (the paper trains
from scratch).
"""

from __future__ import annotations

import copy
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .._checks import check_choice
from ._members_check import verify_shared_members
from .base import Ensemble
from .registry import register_method
from .surgery import ConversionError, convert
from .verify import VerificationReport

__all__ = ["MIMO", "MIMOInput", "MIMOOutput"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_layer(path: str, layer: nn.Module, role: str) -> nn.Linear | _ConvNd:
    """``layer`` if MIMO can widen it as its ``role`` layer (dense ``Linear``/``Conv``), else a ConversionError."""
    if not isinstance(layer, _LAYERS) or isinstance(layer, nn.modules.conv._ConvTransposeNd):
        raise ConversionError(
            path,
            f"MIMO's {role} layer must be nn.Linear or nn.Conv1d/2d/3d, got "
            f"{type(layer).__name__}. Name another one with `{role}_layer=`.",
        )
    if isinstance(layer, _ConvNd) and layer.groups != 1:
        raise ConversionError(
            path,
            f"MIMO's {role} layer is a grouped convolution (groups={layer.groups}); "
            "its channels cannot be widened per member. Name a dense layer with "
            f"`{role}_layer=`.",
        )
    return layer


def _widened(layer: nn.Linear | _ConvNd, in_mult: int, out_mult: int) -> nn.Linear | _ConvNd:
    """A fresh layer of ``layer``'s class with ``in_mult`` x the inputs and ``out_mult`` x the outputs."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return nn.Linear(
            layer.in_features * in_mult,
            layer.out_features * out_mult,
            bias=layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
    conv_class = cast(Any, type(layer))  # Conv1d/2d/3d: one constructor, sizes of their own dimension
    return conv_class(
        layer.in_channels * in_mult,
        layer.out_channels * out_mult,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )


@torch.no_grad()
def _load(layer: nn.Linear | _ConvNd, weight: Tensor, bias: Tensor | None) -> None:
    layer.weight.copy_(weight)
    if bias is not None and layer.bias is not None:
        layer.bias.copy_(bias)


class _Widened(nn.Module):
    """A backbone layer widened for M members: M x its inputs (``"first"``) or M x its outputs (``"last"``)."""

    layer: nn.Linear | _ConvNd
    #: batch size B of the current MIMO call, set by :class:`MIMO` so a misplaced layer is caught.
    expected_batch: int | None = None

    def __init__(self, layer: nn.Module, num_members: int, role: str, path: str) -> None:
        super().__init__()
        source = _check_layer(path, layer, role)
        self.num_members, self.linear = num_members, isinstance(source, nn.Linear)
        m = num_members
        self.layer = _widened(source, m, 1) if role == "first" else _widened(source, 1, m)


class MIMOInput(_Widened):
    """The input layer of M sub-networks: member-major ``(M * B, ..., C)`` in, ``(B, ...)`` out.

    Member ``m``'s activations go to input channels ``[m * C, (m + 1) * C)`` of one wide layer.

    Example:
        >>> import torch
        >>> lin = nn.Linear(4, 8)
        >>> wide = MIMOInput(lin, num_members=3)
        >>> wide.layer.weight.shape
        torch.Size([8, 12])
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(wide(x.repeat(3, 1)), lin(x), atol=1e-6)  # init="copy": blocks W / M
        True

    Args:
        layer: the backbone's input ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (dense).
        num_members: M.
        init: ``"copy"``: every member's block is ``W / M`` (the widened layer computes the backbone's on
            equal member inputs); otherwise the fresh layer's default initialisation.
        path: the layer's path in the model, named by errors.
    """

    def __init__(self, layer: nn.Module, num_members: int, init: str = "copy", path: str = "") -> None:
        super().__init__(layer, num_members, "first", path)
        if init == "copy":  # member blocks W / M on the input axis; the bias once
            w = cast(Tensor, layer.weight).detach()
            _load(self.layer, torch.cat([w / num_members] * num_members, dim=1), cast("Tensor | None", layer.bias))

    def forward(self, x: Tensor) -> Tensor:
        b = self.expected_batch
        if b is not None and x.shape[0] != self.num_members * b:
            raise ValueError(
                f"MIMO's input layer got {x.shape[0]} rows, not the {self.num_members} member inputs of "
                f"the batch of {b} ({self.num_members * b} rows): it is not where the data enters."
            )
        xm = x.unflatten(0, (self.num_members, -1))  # (M, B, ...)
        if self.linear:  # (M, B, ..., C) -> (B, ..., M * C)
            return self.layer(xm.movedim(0, -2).flatten(-2))
        return self.layer(xm.movedim(0, 1).flatten(1, 2))  # (M, B, C, *S) -> (B, M * C, *S)


class MIMOOutput(_Widened):
    """The M heads: ``(B, ...)`` in, member-major ``(M * B, ..., C_out)`` out; head ``m`` = channels ``[m * C, (m + 1) * C)``.

    Example:
        >>> import torch
        >>> head = MIMOOutput(nn.Linear(8, 3), num_members=2)
        >>> head(torch.randn(5, 8)).shape
        torch.Size([10, 3])

    Args:
        layer: the backbone's output ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (dense).
        num_members: M.
        init: ``"copy"``: every head starts as ``layer``; otherwise the fresh layer's default initialisation.
        path: the layer's path in the model, named by errors.
    """

    def __init__(self, layer: nn.Module, num_members: int, init: str = "copy", path: str = "") -> None:
        super().__init__(layer, num_members, "last", path)
        if init == "copy":  # every head is the backbone's
            w, b = cast(Tensor, layer.weight).detach(), cast("Tensor | None", layer.bias)
            _load(self.layer, torch.cat([w] * num_members, dim=0), None if b is None else torch.cat([b] * num_members))

    def forward(self, x: Tensor) -> Tensor:
        b = self.expected_batch
        if b is not None and x.shape[0] != b:
            raise ValueError(
                f"MIMO's output layer got {x.shape[0]} rows where the shared network carries the batch "
                f"of {b}: it is not where the data leaves (or it runs before the input layer)."
            )
        y = self.layer(x)
        if self.linear:  # (B, ..., M * C) -> (M, B, ..., C)
            return y.unflatten(-1, (self.num_members, -1)).movedim(-2, 0).flatten(0, 1)
        return y.unflatten(1, (self.num_members, -1)).movedim(1, 0).flatten(0, 1)


class _MIMOMember(nn.Module):
    """Member ``index`` of a MIMO network: the whole network on the input repeated in every slot, head ``index``."""

    def __init__(self, model: nn.Module, num_members: int, index: int) -> None:
        super().__init__()
        self.model, self.num_members, self.index = model, num_members, index

    def forward(self, x: Tensor) -> Tensor:
        return _forward_slots(self.model, x.unsqueeze(0).expand(self.num_members, *x.shape))[self.index]


def _forward_slots(model: nn.Module, xs: Tensor) -> Tensor:
    """``model`` (a MIMO-converted network) with slot ``m`` fed ``xs[m]``; head outputs ``(M, B, ...)``."""
    m = xs.shape[0]
    layers = [mod for mod in model.modules() if isinstance(mod, _Widened)]
    for layer in layers:
        layer.expected_batch = xs.shape[1]
    try:
        return model(xs.flatten(0, 1)).unflatten(0, (m, -1))
    finally:
        for layer in layers:
            layer.expected_batch = None


@register_method("mimo")
class MIMO(Ensemble):
    """MIMO of any backbone: widened input and output layers, M sub-networks in one forward pass.

    Args:
        backbone: any ``nn.Module`` with a ``Linear``/``Conv`` input and output layer (timm included); a
            copy is converted, the caller's module is unchanged.
        num_members: M (the paper uses 3 on CIFAR, 2 on ImageNet).
        input_repetition: the paper's ``rho``, probability in [0, 1) that members see the same example
            in training (uncertainty-baselines: 0.5 on CIFAR-10, 0.6 on ImageNet).
        batch_repetition: times the batch is tiled in training (outputs ``(M, B * R, ...)``).
        first_layer, last_layer: module paths of the input and output layers; default: the first and
            the last ``Linear``/``Conv`` in registration order.
        init: ``"copy"`` (keep the backbone's function; see the module docstring) or ``"reinit"``.
        verify: after conversion, run the ensemble and every ``member(i)`` on a probe batch (``example_input``,
            else ``randn(2, *input_shape)``, else inferred): a first/last layer that is not where the data
            enters/leaves fails here, with the module named. ``verification`` holds the report.
        backbone_kwargs: arguments building ``backbone`` when it is a name (see ``build_backbone``).

    ``converted`` is ``[first_layer, last_layer]``.

    Example:
        >>> import torch
        >>> from lightning_ensembles.backbones import MLP
        >>> ens = MIMO(MLP(4, 3, hidden=(16,)), num_members=3).eval()
        >>> ens(torch.randn(5, 4)).shape
        torch.Size([3, 5, 3])
        >>> torch.allclose(ens.member(1)(torch.ones(2, 4)), ens(torch.ones(2, 4))[1])
        True
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        num_members: int = 3,
        input_repetition: float = 0.0,
        batch_repetition: int = 1,
        first_layer: str | None = None,
        last_layer: str | None = None,
        init: Literal["copy", "reinit"] = "copy",
        verify: bool = True,
        example_input: Tensor | None = None,
        input_shape: list[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        backbone = self.build_backbone(backbone, backbone_kwargs)
        if not (isinstance(input_repetition, (int, float)) and 0 <= input_repetition < 1):
            raise ValueError(f"`input_repetition` must be in [0, 1), got {input_repetition!r}.")
        if not (isinstance(batch_repetition, int) and batch_repetition >= 1):
            raise ValueError(f"`batch_repetition` must be an integer >= 1, got {batch_repetition!r}.")
        check_choice("init", init, ("copy", "reinit"))
        self.input_repetition, self.batch_repetition, self.init = float(input_repetition), batch_repetition, init
        layers = [p for p, m in backbone.named_modules() if isinstance(m, _LAYERS)]
        first = first_layer if first_layer is not None else (layers[0] if layers else None)
        last = last_layer if last_layer is not None else (layers[-1] if layers else None)
        if first is None or last is None:
            raise ConversionError("", "the backbone has no nn.Linear or nn.Conv layer to widen for MIMO.")
        names = dict(backbone.named_modules())
        for path, role in ((first, "first_layer"), (last, "last_layer")):
            if path not in names or not path:
                raise ConversionError(path, f"`{role}` is not a submodule path of the backbone; e.g. {layers[:6]}.")
        if first == last:
            raise ConversionError(
                first,
                "MIMO needs distinct input and output layers, but the backbone's only "
                "Linear/Conv is both. Use a backbone with a hidden layer.",
            )
        m = num_members

        def build(path: str, mod: nn.Module) -> nn.Module:
            return MIMOInput(mod, m, init, path) if path == first else MIMOOutput(mod, m, init, path)

        self.model, self.converted = convert(backbone, lambda p, mod: p in (first, last), build)
        self.converted = [first, last]
        self.train(backbone.training)
        advice = (
            f"MIMO widened {first!r} as the input layer and {last!r} as the output layer; name the layers "
            "where the data enters and leaves with first_layer=/last_layer=."
        )
        self.verification = (
            verify_shared_members(self, backbone, example_input, input_shape, advice)
            if verify
            else VerificationReport(ran=False)
        )

    _inner_prefix = "model."

    def training_indices(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        """``(M, B * R)`` tiled-batch positions each member's slots read in one training step.

        Every row is a permutation of ``range(B * R)`` (each member sees every example R times); the
        last ``B * R - int(B * R * (1 - rho))`` slots are the same for all members (input repetition).
        Position ``t`` holds example ``t % B``.
        """
        n = batch_size * self.batch_repetition
        main = torch.randperm(n, device=device)
        shuffled = int(n * (1.0 - self.input_repetition))
        rows = [
            torch.cat([main[:shuffled][torch.randperm(shuffled, device=device)], main[shuffled:]])
            for _ in range(self.num_members)
        ]
        return torch.stack(rows)

    def forward_slots(self, xs: Tensor) -> Tensor:
        """Raw MIMO call: slot ``m`` gets ``xs[m]`` ``(M, B, ...)``; returns head outputs ``(M, B, ...)``."""
        if xs.shape[0] != self.num_members:
            raise ValueError(
                f"`xs` must hold one input per member on axis 0 ({self.num_members}), got {tuple(xs.shape)}."
            )
        return _forward_slots(self.model, xs)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluation: ``(M, B, ...)`` on the same input. Training: ``(M, B * R, ...)`` in tiled batch order."""
        if not self.training:
            return self.forward_slots(x.unsqueeze(0).expand(self.num_members, *x.shape))
        b = x.shape[0]
        idx = self.training_indices(b, x.device)  # (M, n) positions
        out = self.forward_slots(x[idx % b])  # slot j of member m read position idx[m, j]
        inverse = torch.argsort(idx, dim=1)  # put each member's outputs back at their positions
        gather = inverse.view(*inverse.shape, *([1] * (out.dim() - 2))).expand_as(out)
        return out.gather(1, gather)

    def stacked_parameters(self) -> dict[str, Tensor]:
        """The member-specific blocks, member axis first (views: gradients flow to the widened layers).

        Input-layer weight blocks ``(M, C_out, C_in, ...)`` and head weights and biases ``(M, C_out, ...)``;
        everything between is shared and left out (it cancels in any distance between members), so
        weight-space repulsion over these equals repulsion over the members' whole weights.
        """
        out: dict[str, Tensor] = {}
        m = self.num_members
        for path, mod in self.model.named_modules():
            if isinstance(mod, MIMOInput):
                out[f"{path}.layer.weight"] = mod.layer.weight.unflatten(1, (m, -1)).movedim(1, 0)
            elif isinstance(mod, MIMOOutput):
                out[f"{path}.layer.weight"] = mod.layer.weight.unflatten(0, (m, -1))
                if mod.layer.bias is not None:
                    out[f"{path}.layer.bias"] = mod.layer.bias.unflatten(0, (m, -1))
        return out

    def member_targets(self, target: Tensor) -> Tensor:
        """``(M, B * R, ...)`` in training (the batch tiled R times), ``(M, B, ...)`` otherwise."""
        if self.training and self.batch_repetition > 1:
            target = target.repeat(self.batch_repetition, *([1] * (target.dim() - 1)))
        return target.unsqueeze(0).expand(self.num_members, *target.shape)

    def member(self, index: int) -> nn.Module:
        """Member ``index``: a copy of the MIMO network fed the same input in every slot, returning head ``index``.

        MIMO members share every weight but the input and output blocks, so a member is not smaller
        than the ensemble.
        """
        index = self._check_index(index)
        return _MIMOMember(copy.deepcopy(self.model), self.num_members, index).train(self.training)

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, input_repetition={self.input_repetition}, "
            f"batch_repetition={self.batch_repetition}, converted={self.converted}"
        )
