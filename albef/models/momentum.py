"""Momentum (EMA) copies and their update, and the feature-queue ring buffer."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def momentum_update(online_params: list[Tensor], momentum_params: list[Tensor], m: float) -> None:
    """EMA in one fused call: momentum <- m * momentum + (1 - m) * online."""
    torch._foreach_lerp_(momentum_params, online_params, 1.0 - m)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` to be the EMA of it (deepcopy keeps shared parameters shared)."""
    return copy.deepcopy(module).requires_grad_(False)


class MomentumModel(nn.Module):
    """Base of the models with momentum copies: a subclass sets `self.momentum` and names the
    momentum copy of its submodule `x` `x_m` (ALBEF's key names, `momentum_copy`); the engine
    calls `momentum_update()` once per optimizer step, before its first forward (ALBEF)."""

    momentum: float

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs: every child `x_m` with its `x`."""
        return [(getattr(self, name[:-2]), module) for name, module in self.named_children()
                if name.endswith("_m") and isinstance(getattr(self, name[:-2], None), nn.Module)]

    def _paired_parameters(self) -> tuple[list[Tensor], list[Tensor]]:
        online, momentum = [], []
        for model, model_m in self._momentum_pairs():
            online.extend(model.parameters())
            momentum.extend(model_m.parameters())
        return online, momentum

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA of the online parameters into the momentum copies (one fused call)."""
        online, momentum = self._paired_parameters()
        if online:
            momentum_update(online, momentum, self.momentum)

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum copies := online weights (ALBEF's `copy_params`, after an initialisation)."""
        online, momentum = self._paired_parameters()
        for p, p_m in zip(online, momentum, strict=True):
            p_m.copy_(p)


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
