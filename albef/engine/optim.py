"""AdamW with ALBEF's weight-decay rule: no decay on biases and 1-D parameters (a 0-d `temp` is
decayed, as in ALBEF's `add_weight_decay`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FUSED_DEVICES = ("cuda", "cpu")  # fused AdamW kernels (CPU since torch 2.4)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group (biases, 1-D norms).

    ALBEF's rule, `len(param.shape) == 1 or name.endswith(".bias")`: the 0-d temperature is decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim_cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters; the fused kernel where torch has one (CUDA, CPU),
    foreach elsewhere."""
    fused = device.type in FUSED_DEVICES
    return torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        fused=fused,
        foreach=None if fused else True,
    )
