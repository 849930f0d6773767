"""Member-major batches ``(M * B, ...)``: member ``i`` owns rows ``[i * B, (i + 1) * B)``.

BatchEnsemble and Masksembles run their converted model on such batches: in evaluation (and with
``batch_mode="repeat"``) every member sees the whole batch, repeated; with ``batch_mode="split"`` in
training the batch itself is cut into M chunks, one per member.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["run_member_major", "member_major_targets"]


def run_member_major(model: nn.Module, x: Tensor, num_members: int, split: bool) -> Tensor:
    """Member outputs ``(M, B', ...)`` of ``model`` on ``x`` repeated per member, or (``split``) cut into M chunks.

    Example:
        >>> import torch
        >>> run_member_major(nn.Identity(), torch.arange(4.0), 2, split=False).tolist()
        [[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]
        >>> run_member_major(nn.Identity(), torch.arange(4.0), 2, split=True).tolist()
        [[0.0, 1.0], [2.0, 3.0]]
    """
    if split:
        if x.shape[0] % num_members:
            raise ValueError(
                f"batch_mode='split' needs a batch size divisible by num_members={num_members}, got "
                f"{x.shape[0]}. Change the batch size or use batch_mode='repeat'."
            )
        rows = x
    else:
        rows = x.unsqueeze(0).expand(num_members, *x.shape).flatten(0, 1)
    return model(rows).unflatten(0, (num_members, -1))


def member_major_targets(target: Tensor, num_members: int, split: bool) -> Tensor:
    """Targets matching :func:`run_member_major`: ``(M, B, ...)`` repeated (a view), or ``(M, B // M, ...)`` split."""
    if split:
        return target.unflatten(0, (num_members, -1))
    return target.unsqueeze(0).expand(num_members, *target.shape)
