"""How the calibration callbacks find predictions in ANY LightningModule.

Contract: ``validation_step`` / ``test_step`` / ``predict_step`` return a dict (a ``Mapping``) with

- one prediction entry, looked up in this order: ``"member_logits"`` ``(M, B, C)``,
  ``"member_probs"`` ``(M, B, C)``, ``"logits"`` ``(B, C)``, ``"probs"`` ``(B, C)``;
- the targets under the first of :data:`TARGET_KEYS` it holds (``"y"``, ``"target"``, ``"targets"``,
  ``"label"``, ``"labels"``): ``(B,)`` class indices.

Lightning passes that dict to ``Callback.on_validation_batch_end(..., outputs, ...)``, which is where
the callbacks read it. With the :class:`~lightning_ensembles.callbacks.Ensembling` callback on the
Trainer, a step that returns nothing is fine: the member outputs it recorded are used. A batch with predictions but no target (e.g. an out-of-distribution test
dataloader) is skipped; a step that returns no recognisable predictions raises a ``ValueError``
naming this contract. The ensemble prediction is the mean of member softmax probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PREDICTION_KEYS = ("member_logits", "member_probs", "logits", "probs")
#: Where targets are found in a step's output dict, and in a dict batch (``Ensembling``): the first key present.
TARGET_KEYS = ("y", "target", "targets", "label", "labels")

CONTRACT = (
    "make `{hook}` return a dict with one of 'member_logits' (M, B, C), 'member_probs' (M, B, C), "
    "'logits' (B, C) or 'probs' (B, C), and the class indices under 'target' (B,)"
)


@dataclass
class Predictions:
    """One batch of predictions as found in a step's output dict."""

    kind: str
    values: Tensor
    target: Tensor | None

    @property
    def probs(self) -> Tensor:
        """Ensemble probabilities ``(B, C)``."""
        v = self.values.detach()
        if self.kind == "member_logits":
            return v.float().softmax(-1).mean(0)
        if self.kind == "member_probs":
            return v.float().mean(0)
        if self.kind == "logits":
            return v.float().softmax(-1)
        return v.float()

    @property
    def member_probs(self) -> Tensor | None:
        """Member probabilities ``(M, B, C)`` when the step gave member outputs, else ``None``."""
        if self.kind == "member_logits":
            return self.values.detach().float().softmax(-1)
        if self.kind == "member_probs":
            return self.values.detach().float()
        return None

    @property
    def scalable(self) -> tuple[Tensor, str]:
        """What temperature scaling divides, and its kind (see :func:`~lightning_ensembles.calibration.scaled_log_probs`)."""
        if self.kind in ("logits", "member_logits"):
            return self.values.detach().float(), self.kind
        return self.probs, "probs"


def find_target(mapping: Mapping[str, Any]) -> Tensor | None:
    """The targets in a dict: the tensor under the first of :data:`TARGET_KEYS` it holds, else ``None``."""
    return next((mapping[k] for k in TARGET_KEYS if isinstance(mapping.get(k), Tensor)), None)


def _holds_predictions(outputs: Any) -> bool:
    return isinstance(outputs, Mapping) and any(isinstance(outputs.get(k), Tensor) for k in PREDICTION_KEYS)


def step_outputs(outputs: Any, trainer: Any, pl_module: Any, batch: Any) -> Any:
    """The step's ``outputs``, or, when they hold no predictions, what an ``Ensembling`` callback recorded.

    This is how the calibration callbacks see member outputs of an unchanged user module whose
    ``validation_step`` returns nothing: :class:`~lightning_ensembles.callbacks.Ensembling` keeps the
    member outputs of the batch and finds its targets.
    """
    if _holds_predictions(outputs):
        return outputs
    for callback in getattr(trainer, "callbacks", []):
        provider = getattr(callback, "member_predictions", None)
        if callable(provider):
            found = provider(pl_module, batch)
            if found is not None:
                return found
    return outputs


def read_predictions(outputs: Any, owner: str, hook: str) -> Predictions:
    """Find predictions (and targets) in a step's ``outputs``; ``ValueError`` that states the contract if none."""
    if isinstance(outputs, Mapping):
        for key in PREDICTION_KEYS:
            value = outputs.get(key)
            if isinstance(value, Tensor):
                want = 3 if key.startswith("member_") else 2
                if value.dim() != want:
                    raise ValueError(
                        f"{owner}: `{hook}` returned '{key}' of shape {tuple(value.shape)}; expected "
                        f"{'(M, B, C)' if want == 3 else '(B, C)'}."
                    )
                return Predictions(key, value, find_target(outputs))
    found = f"a dict with keys {sorted(outputs)}" if isinstance(outputs, Mapping) else type(outputs).__name__
    raise ValueError(f"{owner} found no predictions: `{hook}` returned {found}; " + CONTRACT.format(hook=hook) + ".")


class EpochBuffer:
    """Concatenates one epoch's batches (on CPU) and gathers them from every process."""

    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.kind: str | None = None

    def reset(self) -> None:
        self.parts, self.kind = [], None

    def add(self, values: Tensor, target: Tensor, kind: str) -> None:
        if self.kind is not None and kind != self.kind:
            raise ValueError(f"predictions changed from '{self.kind}' to '{kind}' within one epoch.")
        self.kind = kind
        self.parts.append((values.detach().cpu(), target.detach().cpu()))

    def __len__(self) -> int:
        return len(self.parts)

    def gather(self, trainer: Any) -> tuple[Tensor, Tensor]:
        """All processes' values and targets (batch axis: -2 for values, 0 for targets)."""
        axis = 1 if self.kind == "member_logits" else 0
        values = torch.cat([v for v, _ in self.parts], dim=axis)
        target = torch.cat([t for _, t in self.parts])
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Ranks may hold different numbers of samples: gather Python objects rather than padded tensors.
            everything: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(everything, (values, target))
            values = torch.cat([v for v, _ in everything], dim=axis)
            target = torch.cat([t for _, t in everything])
        return values, target


def stage_prefix(stage: str, dataloader_idx: int) -> str:
    """``val`` / ``test`` for the first dataloader, ``test_dl<k>`` for dataloader ``k > 0``."""
    return stage if dataloader_idx == 0 else f"{stage}_dl{dataloader_idx}"
