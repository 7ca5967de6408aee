"""What every task's evaluation shares: inference autocast (more to come: sharding, gathering,
progress bars, one toolkit)."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def inference_autocast(device: torch.device, precision: str):
    """Autocast for inference on CUDA (bf16 unless the config asks for fp16 or fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
