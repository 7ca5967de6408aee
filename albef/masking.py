"""BERT's MLM masking primitives (ALBEF's `mask`), functions of tensors shared by the model
(`ALBEF.forward` masks plain captions) and the data (`albef.data.masking.MLMMasking`, the
collate step): `TokenIds`, `special_tokens`, `mask_tokens`. Neither layer imports the other.

`mask_tokens` selects tokens with probability p (never [PAD] or [CLS], nor [SEP] when
`mask_sep` is off); of those 80% become [MASK], 10% a random token of the vocabulary, 10% stay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TokenIds", "special_tokens", "mask_tokens"]


@dataclass(frozen=True)
class TokenIds:
    """Special token ids of the tokenizer (MLM never masks pad or cls, nor sep with mlm_mask_sep=False)."""

    pad: int
    cls: int
    sep: int
    mask: int


def special_tokens(token_ids: TokenIds, mask_sep: bool = True) -> Tensor:
    """The ids MLM never masks: [PAD] and [CLS] (ALBEF), plus [SEP] unless `mask_sep`."""
    return torch.tensor([token_ids.pad, token_ids.cls] + ([] if mask_sep else [token_ids.sep]))


def mask_tokens(
    input_ids: Tensor,
    probability: float,
    token_ids: TokenIds,
    vocab_size: int,
    mask_sep: bool = True,
    special: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: select tokens with `probability` (never pad/cls, nor sep when not
    `mask_sep`; `special` = those ids precomputed on the device); of those 80% become [MASK], 10%
    a random token, 10% stay. Returns (masked ids, labels with -100 elsewhere). No host sync.
    Draws from `generator` (default: the global generator of the ids' device)."""
    if special is None:
        special = special_tokens(token_ids, mask_sep).to(input_ids.device)
    device = input_ids.device
    draw = torch.rand(input_ids.shape, device=device, generator=generator)
    selected = (draw < probability) & ~torch.isin(input_ids, special)
    labels = input_ids.masked_fill(~selected, -100)
    choice = torch.rand(input_ids.shape, device=device, generator=generator)
    random_tokens = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator,
                                  dtype=input_ids.dtype)
    masked = torch.where(selected & (choice < 0.8), token_ids.mask, input_ids)
    masked = torch.where(selected & (choice >= 0.9), random_tokens, masked)
    return masked, labels
