"""Loss functions: ITC ce vs kl, targets, MLM and ITM losses."""

import pytest
import torch
import torch.nn.functional as F

from albef.losses import (
    entropy,
    itc_loss,
    itc_stats,
    itc_targets,
    itm_loss,
    kl_divergence,
    mlm_loss,
    soft_cross_entropy,
)


def _targets(batch: int = 4, cols: int = 9, alpha: float = 0.4) -> torch.Tensor:
    pos = torch.zeros(batch, cols, dtype=torch.bool)
    pos[torch.arange(batch), torch.arange(batch)] = True
    pos[0, 5] = True  # a second positive (same image id in the queue)
    return itc_targets(torch.randn(batch, cols) * 3, pos, alpha)


def test_ce_and_kl_have_equal_gradients_and_differ_by_the_target_entropy():
    torch.manual_seed(0)
    targets = _targets()
    logits = torch.randn(4, 9, requires_grad=True)
    ce = itc_loss(logits, targets, "ce")
    (grad_ce,) = torch.autograd.grad(ce, logits)
    kl = itc_loss(logits, targets, "kl")
    (grad_kl,) = torch.autograd.grad(kl, logits)
    torch.testing.assert_close(grad_ce, grad_kl, rtol=0, atol=1e-7)
    torch.testing.assert_close(ce - kl, entropy(targets).mean(), rtol=0, atol=1e-5)
    assert (ce - kl).abs() > 0.1  # the two values really differ


def test_kl_is_zero_when_predictions_equal_targets():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    assert kl_divergence(logits, logits.softmax(-1)).abs().max() < 1e-6
    assert kl_divergence(logits, _targets(5, 7)).min() > 1e-3


def test_zero_targets_contribute_nothing():
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    targets = torch.tensor([[0.25, 0.0, 0.75]])
    log_p = logits.log_softmax(-1)
    nonzero = torch.tensor([0.25, 0.75])
    expected = (nonzero * (nonzero.log() - log_p[0, [0, 2]])).sum()
    torch.testing.assert_close(kl_divergence(logits, targets)[0], expected)
    torch.testing.assert_close(entropy(targets)[0], -(nonzero * nonzero.log()).sum())
    assert torch.isfinite(soft_cross_entropy(logits, targets)).all()


def test_itc_targets_mix_momentum_softmax_and_uniform_positives():
    sim_m = torch.randn(3, 6)
    pos = torch.zeros(3, 6, dtype=torch.bool)
    pos[0, [0, 4]] = True
    pos[1, 1] = pos[2, 2] = True
    hard = itc_targets(sim_m, pos, alpha=0.0)
    assert hard[0, 0] == hard[0, 4] == 0.5 and hard[1, 1] == 1
    mixed = itc_targets(sim_m, pos, alpha=0.4)
    torch.testing.assert_close(mixed, 0.4 * sim_m.softmax(1) + 0.6 * hard)
    torch.testing.assert_close(mixed.sum(1), torch.ones(3))
    assert itc_targets(sim_m.half(), pos, 0.4).dtype == torch.float32


def test_itc_stats_average_both_directions():
    torch.manual_seed(1)
    t1, t2 = _targets(), _targets()
    s1, s2 = torch.randn(4, 9), torch.randn(4, 9)
    stats = itc_stats(s1, s2, t1, t2)
    torch.testing.assert_close(stats["itc_ce"], (itc_loss(s1, t1) + itc_loss(s2, t2)) / 2)
    torch.testing.assert_close(stats["itc_kl"], stats["itc_ce"] - stats["itc_entropy"], rtol=0, atol=1e-5)


def test_unknown_itc_kind_is_rejected():
    with pytest.raises(ValueError, match="loss.itc"):
        itc_loss(torch.zeros(2, 2), torch.eye(2), "mse")


def test_mlm_loss_alpha_zero_is_cross_entropy_and_alpha_one_is_soft_ce():
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    labels = torch.tensor([1, 4, -100, 7, 0, 10])
    soft = torch.randn(6, 11).softmax(-1)
    torch.testing.assert_close(mlm_loss(logits, labels, soft, alpha=0.0), F.cross_entropy(logits, labels))
    valid = labels != -100
    expected = soft_cross_entropy(logits[valid], soft[valid]).mean()
    torch.testing.assert_close(mlm_loss(logits, labels, soft, alpha=1.0), expected)


def test_mlm_loss_without_masked_tokens_is_zero_not_nan():
    logits = torch.zeros(0, 11, requires_grad=True)
    loss = mlm_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 11), alpha=0.4)
    assert loss.item() == 0.0
    loss.backward()


def test_itm_loss_sample_weight_drops_pairs():
    logits = torch.randn(4, 2)
    labels = torch.tensor([1, 0, 0, 1])
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(itm_loss(logits, labels, keep), F.cross_entropy(logits[keep], labels[keep]))
    torch.testing.assert_close(itm_loss(logits, labels), F.cross_entropy(logits, labels))
