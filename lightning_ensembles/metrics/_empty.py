"""The one behaviour of every metric without data: ``compute()`` returns NaN after one :class:`NoSamplesWarning`.

"Without data" means that no process passed a sample to ``update()`` (never called, or only empty
batches): the check runs on the synchronised state. torchmetrics' own "``compute`` called before
``update``" warning is replaced by this one, so an empty metric says so exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

#: The start of torchmetrics' warning for ``compute()`` before ``update()`` (replaced by ours).
_TORCHMETRICS_EMPTY = r"The ``compute`` method of metric"


class NoSamplesWarning(UserWarning):
    """``compute()`` ran on a metric that no sample reached; it returned NaN.

    Silence it with ``warnings.filterwarnings("ignore", category=NoSamplesWarning)``.
    """


def no_samples(metric: object, device: torch.device | str | None = None) -> Tensor:
    """NaN, after one rank-zero :class:`NoSamplesWarning` naming ``metric`` (an object or a name)."""
    name = metric if isinstance(metric, str) else type(metric).__name__
    rank_zero_warn(f"{name}.compute(): no samples were passed to update(); returning NaN.", NoSamplesWarning)
    return torch.tensor(float("nan"), device=device)


@contextlib.contextmanager
def quiet_when_empty(ours: bool = False) -> Iterator[None]:
    """Silence torchmetrics' compute-before-update warning (and ours too with ``ours``) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHMETRICS_EMPTY, category=UserWarning)
        if ours:
            warnings.filterwarnings("ignore", category=NoSamplesWarning)
        yield


def cat_state(state: Tensor | list[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """A list state concatenated; an empty 1-d tensor when nothing was stored (``dim_zero_cat`` raises there)."""
    if isinstance(state, list) and not state:
        return torch.empty(0, dtype=dtype)
    return dim_zero_cat(state)


def _list_spec(state: list[Tensor]) -> tuple[str, tuple[int, ...]] | None:
    """``(dtype name, trailing shape)`` of a non-empty list state, ``None`` for an empty one."""
    if not state:
        return None
    return str(state[0].dtype).removeprefix("torch."), tuple(state[0].shape[1:])


class NaNWhenEmpty:
    """Mixin placed before ``torchmetrics.Metric``: removes torchmetrics' warning for an empty metric,
    and lets a process without samples take part in the sync of list states.

    Each metric's ``compute`` returns :func:`no_samples` itself when its synced state holds no sample.
    """

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        lists = [attr for attr in self._reductions if isinstance(getattr(self, attr), list)]  # type: ignore[attr-defined]
        dist = torch.distributed
        if lists and dist.is_available() and dist.is_initialized():
            group = process_group or self.process_group  # type: ignore[attr-defined]
            local = {attr: _list_spec(getattr(self, attr)) for attr in lists}
            everyone: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, local, group=group)
            for attr in lists:
                spec = next((specs[attr] for specs in everyone if specs[attr] is not None), None)
                if local[attr] is None and spec is not None:  # restored from the cache after the sync
                    dtype, trailing = spec
                    device = self.device  # type: ignore[attr-defined]
                    setattr(self, attr, [torch.empty((0, *trailing), dtype=getattr(torch, dtype), device=device)])
        kwargs = {} if dist_sync_fn is None else {"dist_sync_fn": dist_sync_fn}
        super()._sync_dist(process_group=process_group, **kwargs)  # type: ignore[misc]

    def _wrap_compute(self, compute: Callable) -> Callable:
        wrapped = super()._wrap_compute(compute)  # type: ignore[misc]

        @functools.wraps(compute)
        def compute_quietly(*args: Any, **kwargs: Any) -> Any:
            if self.update_called:  # type: ignore[attr-defined]
                return wrapped(*args, **kwargs)
            with quiet_when_empty():
                return wrapped(*args, **kwargs)

        return compute_quietly
