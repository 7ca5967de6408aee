"""Small ops the training step spends less on than their stock versions, with the same results
(tests/test_fast_paths.py checks each):

- `take_rows(x, index)`: `x.index_select(0, index)` whose backward makes the incoming gradient
  contiguous before `index_add_`. Autograd's own backward feeds index_add_ the gradient as it
  comes (here a head-transposed view), which on CPU takes a scatter path ~5x slower.
- `Dropout`: `nn.Dropout` whose keep-mask, on CPU, comes from 64-bit random words, two 32-bit
  draws per word, instead of one `bernoulli_` draw per element (torch's CPU Bernoulli is a
  serial loop). Same distribution: each element is kept with probability 1 - p to within 2**-31
  (float32 `bernoulli_` resolves p to 2**-24); a different random stream than `nn.Dropout`, drawn
  from the same torch CPU generator, so seeded runs and resumes stay exact. On CUDA and under
  torch.compile it is `F.dropout` (already fused there).
- `TiedGradient`: one dense gradient for a weight that an embedding lookup and a later linear
  layer share (BERT's word embeddings and its tied MLM decoder). Stock autograd gives the
  lookup's gradient as a zero-filled [vocab, hidden] tensor and adds the decoder's to it (two
  full passes over the largest weight, twice the memory); here the decoder's backward, which
  always runs first, leaves its weight gradient with the `TiedGradient`, and the lookup's
  backward adds its rows into that tensor in place and hands it to autograd as the weight's one
  gradient. CPU only (on CUDA those passes cost next to nothing): elsewhere the stock ops.
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


class TiedGradient:
    """Joins the weight gradients of `embedding(...)` and a later `linear(...)` of one forward
    pass on the same weight (see the module docstring). Use a new one per forward pass; the
    linear layer's input must depend on the lookup's output (its backward then runs first)."""

    def __init__(self) -> None:
        self.pending: Tensor | None = None

    def embedding(self, ids: Tensor, weight: Tensor, padding_idx: int | None = None) -> Tensor:
        if not _joins(weight):
            return F.embedding(ids, weight, padding_idx)
        return _JoinedEmbedding.apply(ids, weight, padding_idx, self)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not _joins(weight):
            return F.linear(x, weight, bias)
        return _JoinedLinear.apply(x, weight, bias, self)


def _joins(weight: Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


class _JoinedLinear(torch.autograd.Function):
    """F.linear whose weight gradient goes to the TiedGradient instead of to autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tied: TiedGradient) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tied, ctx.has_bias = tied, bias is not None
        return F.linear(x, weight, bias)  # under autocast: in the autocast dtype, as F.linear

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # computed in the gradient's (autocast) dtype, as F.linear's
        grad_x = (rows @ weight.to(rows.dtype)).to(x.dtype).view(*grad.shape[:-1], weight.shape[1])
        grad_weight = (rows.t() @ x.reshape(-1, x.shape[-1]).to(rows.dtype)).to(weight.dtype)
        tied = ctx.tied
        tied.pending = grad_weight if tied.pending is None else tied.pending.add_(grad_weight)
        grad_bias = rows.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_x, None, grad_bias, None


class _JoinedEmbedding(torch.autograd.Function):
    """F.embedding whose weight gradient is added into the TiedGradient's pending tensor."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None, tied: TiedGradient) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.tied, ctx.padding_idx, ctx.shape, ctx.dtype = tied, padding_idx, weight.shape, weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        tied = ctx.tied
        total, tied.pending = tied.pending, None
        if total is None:  # the linear layer took no part in this pass
            total = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
        rows = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        if ctx.padding_idx is not None:  # the padding row gets no gradient (F.embedding)
            rows = rows * (ids.reshape(-1, 1) != ctx.padding_idx)
        return None, total.index_add_(0, ids.reshape(-1), rows), None, None


# The two 32-bit halves of a random int64 from `random_()` (uniform on [0, 2**63)): the low word,
# read as a signed int32, is uniform on [-2**31, 2**31); the high word on [0, 2**31).
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """Boolean CPU mask of `shape`, each element True with probability 1 - p, from the torch CPU
    generator (two elements per 64-bit random word)."""
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 1) // 2, dtype=torch.int64).random_()
    thresholds = torch.empty(2, dtype=torch.int32)
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
