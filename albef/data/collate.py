"""Tokenising collate, run inside the DataLoader workers.

Returns the batch of docs/DESIGN.md: ``images`` float [B,3,H,W] (with data.decode=device an
`EncodedImages` that becomes that tensor when moved to the device); ``input_ids`` and
``attention_mask`` long [B,L] (padded to the longest caption, at most `max_tokens`; to exactly
`max_tokens` with `pad_to_max`, so that every batch has the same shape); ``ids`` long
[B] image ids; ``index`` long [B] dataset indices; ``skipped`` {reason: count} for the `BadSample`
markers dropped from this batch; with `mlm` (`MLMMasking`, pretraining) also the masked captions
``mlm_input_ids`` / ``mlm_labels`` [B,L] and the masked positions ``mlm_batch`` /
``mlm_position`` [M]. B may be smaller than the batch size, and 0 when every sample
was bad (then ``images`` is empty and L is 0): the engine counts ``skipped`` and skips the step.
"""
import logging
from collections import Counter
from collections.abc import Sequence

import torch

from .datasets import BadSample
from .device_decode import stack_images
from .masking import MLMMasking

logger = logging.getLogger(__name__)


class Collator:
    """Picklable ``collate_fn``: drop bad samples, tokenise captions, stack images."""

    def __init__(self, tokenizer, max_tokens: int, pad_to_max: bool = False, mlm: MLMMasking | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.pad_to_max = pad_to_max
        self.mlm = mlm

    def __call__(self, samples: Sequence[dict | BadSample]) -> dict:
        good = [s for s in samples if not isinstance(s, BadSample)]
        bad = [s for s in samples if isinstance(s, BadSample)]
        for sample in bad:
            logger.warning("skipping sample %d (%s): %s", sample.index, sample.reason, sample.detail)
        batch = {
            "ids": torch.tensor([s["id"] for s in good], dtype=torch.long),
            "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
            "skipped": dict(Counter(s.reason for s in bad)),
        }
        if not good:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"images": torch.zeros(0, 3, 0, 0), "input_ids": empty, "attention_mask": empty, **batch}
        text = self.tokenizer(
            [s["caption"] for s in good],
            padding="max_length" if self.pad_to_max else "longest",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        if self.mlm is not None:  # each caption masked under its sample's MLM seed
            batch.update(self.mlm(text["input_ids"], [s["mlm_seed"] for s in good]))
        return {
            "images": stack_images([s["image"] for s in good]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            **batch,
        }
