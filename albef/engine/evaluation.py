"""What every task's evaluation shares -- one toolkit, so that no task takes plumbing from another:

* `eval_files(cfg, split)`: the annotation files of "val" / "test";
* `shard(n)` / `shard_subset(dataset)`: this rank's contiguous block of the rows (the one sharding
  style: ranks in order, so a gather in rank order gives the rows back in their order);
* `gather_rows(t)`: a tensor's rows from every rank, in rank order (uneven blocks allowed);
  `gather_objects(obj)` / `gather_lists(items)`: picklable objects / lists from every rank;
* `inference_autocast(device, precision)`: the autocast of inference on CUDA;
* `progress(total, desc, unit)`: a progress display with ETA on rank 0's stderr;
* `stoppable(items, count)`: the stop-signal check between evaluation batches (albef/dist.py),
  which every evaluation loop goes through.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, Subset

from albef.dist import gather_objects, gather_rows, get_rank, get_world_size, stoppable
from albef.engine.logging import progress as _progress_display

__all__ = ["eval_files", "gather_lists", "gather_objects", "gather_rows", "inference_autocast", "progress",
           "shard", "shard_subset", "stoppable"]


def eval_files(cfg, split: str) -> list[str]:
    """The annotation files of `split` ("val" or "test")."""
    return {"val": cfg.eval.val_files, "test": cfg.eval.test_files}[split]


def inference_autocast(device: torch.device, precision: str):
    """Autocast for inference on CUDA (bf16 unless the config asks for fp16 or fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def shard(num_rows: int) -> slice:
    """This process's contiguous block of `num_rows` (ranks in order; the last ones may be short
    or empty)."""
    step = math.ceil(num_rows / get_world_size())
    start = min(num_rows, get_rank() * step)
    return slice(start, min(num_rows, start + step))


def shard_subset(dataset: Dataset) -> Subset:
    """This process's contiguous block of `dataset` (`shard`), as a Subset."""
    block = shard(len(dataset))
    return Subset(dataset, range(block.start, block.stop))


def gather_lists(items: Sequence[Any]) -> list[Any]:
    """Every rank's `items` concatenated in rank order (with `shard`: the items in row order)."""
    return [item for part in gather_objects(list(items)) for item in part]


def progress(total: int, desc: str, unit: str):
    """Progress with ETA on rank 0's stderr (silent on other ranks and for empty work): a bar on
    a terminal, plain lines every 30 s in a log file (albef.engine.logging.progress)."""
    return _progress_display(total, desc, unit, enabled=get_rank() == 0)
