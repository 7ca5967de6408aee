"""BERT's MLM masking (ALBEF's `mask`) as a collate step (`MLMMasking`); the functions of tensors
(`TokenIds`, `special_tokens`, `mask_tokens`) are albef/masking.py, shared with the model.

`mask_tokens` selects tokens with probability p (never [PAD] or [CLS], nor [SEP] when
`mask_sep` is off); of those 80% become [MASK], 10% a random token of the vocabulary, 10% stay.

The pretraining model masks inside its forward when given plain captions (`ALBEF.forward`).
The training loader instead masks in the collate (`MLMMasking`, run in the DataLoader workers):
each caption with its own generator seeded from (seed, epoch, index), so a resumed run draws the
same masks, and with the masked positions found on the CPU, so the step needs no host sync to
learn how many rows the MLM head reads. Same distribution either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from albef.masking import TokenIds, mask_tokens, special_tokens  # noqa: F401  (the primitives, re-exported)


MLM_KEYS = ("mlm_input_ids", "mlm_labels", "mlm_batch", "mlm_position")  # what MLMMasking adds to a batch


@dataclass(frozen=True)
class MLMMasking:
    """The collate's masking (picklable): each row of a batch masked with its own generator."""

    probability: float
    token_ids: TokenIds
    vocab_size: int
    mask_sep: bool = True

    def __call__(self, input_ids: Tensor, seeds: list[int]) -> dict[str, Tensor]:
        """``mlm_input_ids`` and ``mlm_labels`` [B, L], and the masked positions
        ``mlm_batch`` / ``mlm_position`` [M] (found here, on the CPU)."""
        special = special_tokens(self.token_ids, self.mask_sep)
        generator = torch.Generator()
        rows = []
        for ids, seed in zip(input_ids, seeds):
            generator.manual_seed(seed)
            rows.append(mask_tokens(ids[None], self.probability, self.token_ids, self.vocab_size,
                                    special=special, generator=generator))
        masked = torch.cat([m for m, _ in rows]) if rows else input_ids.clone()
        labels = torch.cat([lab for _, lab in rows]) if rows else torch.full_like(input_ids, -100)
        batch, position = (labels != -100).nonzero(as_tuple=True)
        return {"mlm_input_ids": masked, "mlm_labels": labels, "mlm_batch": batch, "mlm_position": position}
