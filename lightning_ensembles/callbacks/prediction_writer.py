"""PredictionWriter: stream per-sample ensemble predictions and uncertainties to a file, in dataset order.

Built on Lightning's :class:`~lightning.pytorch.callbacks.BasePredictionWriter`. Each process appends
the rows of every predict batch to its own part file as the batch arrives (nothing is held in memory),
keyed by the dataset index Lightning's predict loop records; when prediction ends, rank 0 merges the
parts into one file ordered by that index, dropping the duplicates a ``DistributedSampler`` pads with.

Columns, from what ``predict_step`` returns (a dict as :class:`~lightning_ensembles.EnsembleClassifier`
and :class:`~lightning_ensembles.EnsembleRegressor` return, or a tensor of member outputs/logits):

* classification: ``prob_<c>`` (ensemble probabilities), ``pred``, ``confidence``, ``entropy``,
  ``mutual_information``, and with ``members=True`` ``member<i>_prob_<c>``;
* regression: ``mean_<d>``, ``aleatoric_<d>``, ``epistemic_<d>``, ``variance_<d>``, and with
  ``members=True`` ``member<i>_mean_<d>`` where the step returns member means.

Formats: ``"csv"`` (small outputs, readable anywhere) or ``"npy"`` (large: a float64 ``(N, F)`` array
written through a memory map, with column names in ``<path>.columns.json``); ``"auto"`` picks from the
file name's suffix.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .._checks import check_choice
from ..metrics.diversity import entropy

Format = Literal["auto", "csv", "npy"]


def prediction_columns(outputs: Any, members: bool) -> dict[str, Tensor]:
    """Named ``(B,)`` columns of one predict batch (see the module docstring for the names)."""
    if isinstance(outputs, Tensor):
        member = outputs if outputs.dim() == 3 else outputs.unsqueeze(0)  # (M, B, C) logits
        outputs = {"member_probs": member.float().softmax(-1)}
    if not isinstance(outputs, Mapping):
        raise ValueError(
            f"PredictionWriter needs predict_step to return a dict or a tensor of logits, got {type(outputs).__name__}."
        )
    cols: dict[str, Tensor] = {}

    def add(prefix: str, values: Tensor) -> None:
        values = values.detach().double().cpu()
        values = values.reshape(values.shape[0], -1)
        for j in range(values.shape[1]):
            cols[f"{prefix}_{j}"] = values[:, j]

    if "mean" in outputs:  # regression
        mean = outputs["mean"]
        for key in ("mean", "aleatoric", "epistemic", "variance"):
            if key in outputs:
                add(key, outputs[key])
        if members and "member_mean" in outputs:
            for i, m in enumerate(outputs["member_mean"]):
                add(f"member{i}_mean", m)
        if not cols:
            add("mean", mean)
        return cols
    member_probs = outputs.get("member_probs")
    if member_probs is None and "member_logits" in outputs:
        member_probs = outputs["member_logits"].float().softmax(-1)
    probs = outputs.get("probs")
    if probs is None:
        if member_probs is None:
            raise ValueError(
                "PredictionWriter found no predictions: return 'probs' (B, C), 'member_probs' / 'member_logits' "
                "(M, B, C) or, for regression, 'mean' from predict_step."
            )
        probs = member_probs.float().mean(0)
    probs = probs.detach().double().cpu()
    add("prob", probs)
    cols["pred"] = probs.argmax(-1).double()
    cols["confidence"] = probs.max(-1).values
    cols["entropy"] = entropy(probs)
    if member_probs is not None:
        mp = member_probs.detach().double().cpu()
        cols["mutual_information"] = cols["entropy"] - entropy(mp).mean(0)
        if members:
            for i, m in enumerate(mp):
                add(f"member{i}_prob", m)
    return cols


class PredictionWriter(BasePredictionWriter):
    """Write per-sample ensemble predictions and uncertainties of ``trainer.predict`` to ``path``.

    Args:
        path: output file (``.csv`` or ``.npy``).
        format: ``"csv"``, ``"npy"`` or ``"auto"`` (from the suffix).
        members: also write every member's probabilities (classification) or means (regression).

    Example:
        >>> import lightning as L, tempfile, os, csv
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> path = os.path.join(tempfile.mkdtemp(), "preds.csv")
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> trainer = L.Trainer(callbacks=[PredictionWriter(path)], logger=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> _ = trainer.predict(model, DigitsDataModule(), return_predictions=False)
        >>> rows = list(csv.DictReader(open(path)))
        >>> len(rows), rows[0]["index"], "mutual_information" in rows[0]
        (360, '0', True)
    """

    def __init__(self, path: str | os.PathLike, format: Format = "auto", members: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        check_choice("format", format, ("csv", "npy", "auto"))
        self.format = format if format != "auto" else ("npy" if self.path.suffix == ".npy" else "csv")
        self.members = members
        self._part: Any = None
        self._columns: list[str] | None = None

    def _part_path(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.rank{rank}.part")

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._columns = None
        self._part = open(self._part_path(trainer.global_rank), "wb")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        cols = prediction_columns(prediction, self.members)
        if self._columns is None:
            self._columns = list(cols)
        elif list(cols) != self._columns:
            raise ValueError(f"predict batch {batch_idx} gives columns {list(cols)}, earlier batches {self._columns}.")
        n = next(iter(cols.values())).shape[0]
        if batch_indices is None or len(batch_indices) != n:
            raise ValueError(
                "PredictionWriter needs the dataset index of every sample; Lightning records it for map-style "
                "datasets with a sampler (not for iterable datasets)."
            )
        index = torch.as_tensor(list(batch_indices), dtype=torch.float64)[:, None]
        rows = torch.cat([index, torch.stack([cols[c] for c in self._columns], 1)], 1)
        # Raw float64 rows: appended and flushed per batch, so nothing accumulates in memory.
        self._part.write(rows.numpy().astype("<f8").tobytes())
        self._part.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._part.close()
        if trainer.global_rank == 0 and self._columns is not None:
            with open(self.path.with_name(self.path.name + ".columns.json"), "w") as f:
                json.dump(self._columns, f)
        trainer.strategy.barrier("PredictionWriter")
        if trainer.global_rank == 0:
            self._merge(trainer.world_size)
        trainer.strategy.barrier("PredictionWriter.merged")

    def _merge(self, world_size: int) -> None:
        columns_file = self.path.with_name(self.path.name + ".columns.json")
        columns = json.loads(columns_file.read_text())
        width = len(columns) + 1
        parts = [
            np.memmap(self._part_path(r), dtype="<f8", mode="r").reshape(-1, width)
            for r in range(world_size)
            if self._part_path(r).stat().st_size
        ]
        index = np.concatenate([p[:, 0] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
        order = np.unique(index)  # sorted; a padded duplicate has the same index and the same values
        where = {int(i): k for k, i in enumerate(order)}
        if self.format == "npy":
            out = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float64, shape=(len(order), width - 1))
            for p in parts:
                for start in range(0, len(p), 65536):  # bounded memory for any size
                    chunk = p[start : start + 65536]
                    out[[where[int(i)] for i in chunk[:, 0]]] = chunk[:, 1:]
            out.flush()
            del out
        else:
            rows = np.concatenate(parts) if parts else np.zeros((0, width))
            rows = rows[np.unique(rows[:, 0], return_index=True)[1]]
            with open(self.path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["index", *columns])
                for r in rows:
                    writer.writerow([int(r[0]), *(repr(float(v)) for v in r[1:])])
            columns_file.unlink()
        for r in range(world_size):
            self._part_path(r).unlink(missing_ok=True)


def read_predictions_file(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(columns, values)`` of a file :class:`PredictionWriter` wrote (CSV: the ``index`` column included).

    Example:
        >>> import numpy as np, tempfile, os, json
        >>> p = os.path.join(tempfile.mkdtemp(), "x.npy"); np.save(p, np.ones((2, 1)))
        >>> _ = open(p + ".columns.json", "w").write(json.dumps(["a"]))
        >>> read_predictions_file(p)[0]
        ['a']
    """
    path = Path(path)
    if path.suffix == ".npy":
        return json.loads(path.with_name(path.name + ".columns.json").read_text()), np.load(path)
    with open(path) as f:
        reader = csv.reader(f)
        header = next(reader)
        values = np.array([[float(v) for v in row] for row in reader], dtype=np.float64).reshape(-1, len(header))
    return header, values


__all__: Sequence[str] = ["PredictionWriter", "prediction_columns", "read_predictions_file"]
