"""Two small ops the training step spends less on than their stock versions, with the same
results (tests/test_fast_paths.py checks both):

- `take_rows(x, index)`: `x.index_select(0, index)` whose backward makes the incoming gradient
  contiguous before `index_add_`. Autograd's own backward feeds index_add_ the gradient as it
  comes (here a head-transposed view), which on CPU takes a scatter path ~5x slower.
- `Dropout`: `nn.Dropout` whose keep-mask, on CPU, comes from 64-bit random words, two 32-bit
  draws per word, instead of one `bernoulli_` draw per element (torch's CPU Bernoulli is a
  serial loop). Same distribution: each element is kept with probability 1 - p to within 2**-31
  (float32 `bernoulli_` resolves p to 2**-24); a different random stream than `nn.Dropout`, drawn
  from the same torch CPU generator, so seeded runs and resumes stay exact. On CUDA and under
  torch.compile it is `F.dropout` (already fused there).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_add_(0, index, grad.contiguous()), None


def take_rows(x: Tensor | None, index: Tensor | None) -> Tensor | None:
    """Rows `index` of `x` (x itself when either is None)."""
    if x is None or index is None:
        return x
    if not x.requires_grad or not torch.is_grad_enabled():
        return x.index_select(0, index)
    return _TakeRows.apply(x, index)


# The two 32-bit halves of a random int64 from `random_()` (uniform on [0, 2**63)): the low word,
# read as a signed int32, is uniform on [-2**31, 2**31); the high word on [0, 2**31).
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """Boolean mask of `shape`, each element True with probability 1 - p, from the torch
    generator of `device` (two elements per 64-bit random word)."""
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_()
    thresholds = torch.empty(2, dtype=torch.int32, device=device)
    thresholds[_LOW] = -(2**31) + round(p * 2**32)
    thresholds[_HIGH] = round(p * 2**31)
    return (words.view(torch.int32).view(-1, 2) >= thresholds).view(-1)[:numel].view(shape)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """`F.dropout(x, p, training)`, with `keep_mask` on CPU."""
    if not training or p == 0.0 or x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return x * (keep_mask(x.shape, p) * (1.0 / (1.0 - p))).to(x.dtype)


class Dropout(nn.Dropout):
    """`nn.Dropout` through `dropout` (a faster keep-mask on CPU; no parameters, same keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
