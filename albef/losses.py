"""ALBEF loss functions: pure functions of tensors (no model, no state).

Softmaxes run in fp32 (logits are cast with `.float()`), so the losses are safe under autocast.
Per-row helpers return one value per row; the `*_loss` functions reduce to a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ITC_KINDS = ("ce", "kl")


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy H(targets, softmax(logits)) -> [N]."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def entropy(targets: Tensor) -> Tensor:
    """Per-row entropy of a distribution, with 0 * log 0 = 0 -> [N]."""
    return -torch.special.xlogy(targets, targets).sum(dim=-1)


def kl_divergence(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row KL(targets || softmax(logits)) -> [N]; terms with targets == 0 count as 0."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_probs, targets.float(), reduction="none").sum(dim=-1)


def itc_targets(sim_m: Tensor, pos_mask: Tensor, alpha: float | Tensor) -> Tensor:
    """Distilled ITC targets: alpha * softmax(momentum sims) + (1 - alpha) * uniform over positives."""
    pos = pos_mask.float()
    hard = pos / pos.sum(dim=1, keepdim=True)
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def itc_loss(logits: Tensor, targets: Tensor, kind: str = "ce") -> Tensor:
    """Contrastive loss of one direction, mean over the batch.

    `ce` is ALBEF's soft cross-entropy; `kl` subtracts the (constant) target entropy, so both give
    the same gradients while `kl` reaches 0 when the predictions match the targets.
    """
    if kind == "ce":
        return soft_cross_entropy(logits, targets).mean()
    if kind == "kl":
        return kl_divergence(logits, targets).mean()
    raise ValueError(f"loss.itc must be one of {ITC_KINDS}, got {kind!r}")


@torch.no_grad()
def itc_stats(
    sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor, targets_t2i: Tensor
) -> dict[str, Tensor]:
    """Detached ITC diagnostics (`itc_ce`, `itc_kl`, `itc_entropy`), both directions averaged."""
    stats = {}
    for name, fn in (("itc_ce", soft_cross_entropy), ("itc_kl", kl_divergence)):
        stats[name] = (fn(sim_i2t, targets_i2t).mean() + fn(sim_t2i, targets_t2i).mean()) / 2
    stats["itc_entropy"] = (entropy(targets_i2t).mean() + entropy(targets_t2i).mean()) / 2
    return stats


def itm_loss(logits: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """Image-text matching cross-entropy; `sample_weight` (0/1 per pair) drops pairs from the mean."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    if sample_weight is None:
        return losses.mean()
    sample_weight = sample_weight.to(losses.dtype)
    return (losses * sample_weight).sum() / sample_weight.sum().clamp(min=1)


def mlm_loss(
    logits: Tensor, labels: Tensor, soft_targets: Tensor | None = None, alpha: float | Tensor = 0.0
) -> Tensor:
    """Masked LM loss (1 - alpha) * CE(labels) + alpha * soft CE(soft_targets).

    `logits` [M, V] and `labels` [M] (-100 = ignored); `soft_targets` [M, V] are the momentum
    model's probabilities. With no valid label the loss is a graph-connected 0, not NaN.
    """
    valid = labels != -100
    num_valid = valid.sum().clamp(min=1)
    hard = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum") / num_valid
    if soft_targets is None:
        return hard
    soft = (soft_cross_entropy(logits, soft_targets) * valid).sum() / num_valid
    return (1 - alpha) * hard + alpha * soft


def classification_distill_loss(
    logits: Tensor, targets: Tensor, logits_m: Tensor | None = None, alpha: float | Tensor = 0.0
) -> Tensor:
    """ALBEF's VE / NLVR2 loss: (1 - alpha) * CE(logits, targets) + alpha * soft CE against the
    momentum model's softmax(logits_m); plain CE without `logits_m`. Mean over the batch."""
    hard = F.cross_entropy(logits.float(), targets)
    if logits_m is None:
        return hard
    soft = soft_cross_entropy(logits, F.softmax(logits_m.float(), dim=-1)).mean()
    return (1 - alpha) * hard + alpha * soft


def answer_sequence_loss(
    logits: Tensor, targets: Tensor, soft_targets: Tensor | None = None, alpha: float | Tensor = 0.0
) -> Tensor:
    """Per-sequence language-model loss [N] of ALBEF's answer decoder (summed over tokens).

    `logits` [N, L, V] predict `targets` [N, L] (-100 where there is no token). With
    `soft_targets` [N, L, V] (the momentum decoder's distributions) the loss is
    (1 - alpha) * cross-entropy + alpha * soft cross-entropy, both over the target tokens.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    valid = targets != -100
    nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (nll * valid).sum(dim=1)
    if soft_targets is not None:
        distill = -(soft_targets * log_probs).sum(dim=-1)
        loss = (1 - alpha) * loss + alpha * (distill * valid).sum(dim=1)
    return loss
