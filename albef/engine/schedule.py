"""ALBEF schedules: learning rate (linear warmup per step in epoch 0, cosine per epoch) and the
alpha ramp."""

from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, epoch: int, optim_cfg: Any, epochs: int) -> float:
    """Learning rate for optimizer step `step` (0-based, global) taken during `epoch`.

    Warmup: the first `warmup_steps` steps of epoch 0 ramp linearly from `warmup_lr` towards
    `lr` (ALBEF's Pretrain.py warms up in epoch 0 only: when epoch 0 is shorter, epoch 1 starts
    on the cosine; `optim.warmup_across_epochs: true` carries the ramp on into later epochs).
    Afterwards the rate follows a cosine over epochs: min_lr + 0.5 (lr - min_lr) (1 + cos(pi epoch / epochs)).
    """
    if step < optim_cfg.warmup_steps and (epoch == 0 or optim_cfg.warmup_across_epochs):
        return optim_cfg.warmup_lr + (optim_cfg.lr - optim_cfg.warmup_lr) * step / optim_cfg.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return optim_cfg.min_lr + (optim_cfg.lr - optim_cfg.min_lr) * cosine


def alpha_at(epoch: int, step_in_epoch: int, steps_per_epoch: int, alpha: float, warmup: bool) -> float:
    """Distillation weight: ramped linearly over the first epoch when `warmup`, else constant."""
    if not warmup or epoch > 0:
        return alpha
    return alpha * min(1.0, step_in_epoch / max(steps_per_epoch, 1))
