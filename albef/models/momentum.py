"""Momentum (EMA) parameter update and the feature-queue ring buffer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def momentum_update(online_params: list[Tensor], momentum_params: list[Tensor], m: float) -> None:
    """EMA in one fused call: momentum <- m * momentum + (1 - m) * online."""
    torch._foreach_lerp_(momentum_params, online_params, 1.0 - m)


@torch.no_grad()
def enqueue_(queues: Sequence[Tensor], ptr: Tensor, columns: Sequence[Tensor]) -> None:
    """Write new columns into ring-buffer `queues` ([D, Q] each) at `ptr` and advance it.

    Any number of columns is accepted: the write wraps around the end, and when more than Q
    columns arrive only the newest Q are kept. The oldest column always sits at the new `ptr`,
    so reading from `ptr` onwards gives FIFO order. No host synchronisation.
    """
    size = queues[0].shape[1]
    num_new = columns[0].shape[1]
    keep = min(num_new, size)
    slots = (ptr + (num_new - keep) + torch.arange(keep, device=ptr.device)) % size
    for queue, cols in zip(queues, columns, strict=True):
        queue.index_copy_(1, slots, cols[:, num_new - keep:].to(queue.dtype))
    ptr.copy_((ptr + num_new) % size)
