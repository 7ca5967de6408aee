"""lr schedule (warmup per step, cosine per epoch), alpha ramp and AdamW parameter groups."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from albef.engine.optim import build_optimizer, param_groups
from albef.engine.schedule import alpha_at, lr_at

OPTIM = SimpleNamespace(lr=1e-4, warmup_lr=1e-5, warmup_steps=100, warmup_across_epochs=False, min_lr=1e-6,
                        weight_decay=0.02, betas=[0.9, 0.999])


def test_warmup_is_linear_from_warmup_lr_to_lr():
    assert lr_at(0, 0, OPTIM, 30) == pytest.approx(1e-5)
    assert lr_at(50, 0, OPTIM, 30) == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))
    assert lr_at(99, 0, OPTIM, 30) == pytest.approx(1e-5 + 0.99 * (1e-4 - 1e-5))
    assert lr_at(100, 0, OPTIM, 30) == pytest.approx(1e-4)


def test_cosine_per_epoch_endpoints():
    assert lr_at(5000, 0, OPTIM, 30) == pytest.approx(1e-4)
    assert lr_at(5000, 15, OPTIM, 30) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert lr_at(5000, 30, OPTIM, 30) == pytest.approx(1e-6)
    expected = 1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 7 / 30))
    assert lr_at(5000, 7, OPTIM, 30) == pytest.approx(expected)
    # constant within an epoch once warmup is over
    assert lr_at(3000, 7, OPTIM, 30) == lr_at(4000, 7, OPTIM, 30)


def test_warmup_is_confined_to_epoch_0_as_albef_unless_asked():
    """ALBEF's Pretrain.py: `if epoch==0 and ... i<=warmup_iterations`; epoch 1 is on the cosine."""
    cosine_1 = 1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 1 / 30))
    assert lr_at(60, 1, OPTIM, 30) == pytest.approx(cosine_1)
    across = SimpleNamespace(**{**vars(OPTIM), "warmup_across_epochs": True})
    assert lr_at(60, 1, across, 30) == pytest.approx(1e-5 + 0.6 * (1e-4 - 1e-5))
    assert lr_at(100, 1, across, 30) == pytest.approx(cosine_1)


def test_no_warmup_starts_at_lr():
    optim = SimpleNamespace(**{**vars(OPTIM), "warmup_steps": 0})
    assert lr_at(0, 0, optim, 30) == pytest.approx(1e-4)


def test_alpha_ramps_over_first_epoch_only():
    assert alpha_at(0, 0, 100, 0.4, True) == 0.0
    assert alpha_at(0, 50, 100, 0.4, True) == pytest.approx(0.2)
    assert alpha_at(0, 100, 100, 0.4, True) == pytest.approx(0.4)
    assert alpha_at(1, 0, 100, 0.4, True) == 0.4
    assert alpha_at(0, 0, 100, 0.4, False) == 0.4


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_decay_on_biases_and_1d_params():
    """ALBEF's add_weight_decay exempts `len(shape) == 1` and `.bias`: the 0-d temp is decayed."""
    model = _Toy()
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model.linear.weight), id(model.pos_embed), id(model.temp)}
    assert ids(no_decay) == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}


def test_fused_adamw_on_cpu_matches_foreach():
    """The fused CPU kernel takes the same steps as the foreach implementation."""
    torch.manual_seed(0)
    models = [_Toy(), _Toy()]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], OPTIM, torch.device("cpu"))
    assert fused.defaults["fused"]
    groups = param_groups(models[1], OPTIM.weight_decay)
    reference = torch.optim.AdamW(groups, lr=OPTIM.lr, betas=(0.9, 0.999), foreach=True)
    for step in range(3):
        for model, optimizer in zip(models, (fused, reference)):
            torch.manual_seed(step)
            (model.linear(torch.randn(2, 4)).pow(2).sum() + model.temp + model.pos_embed.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_build_optimizer_skips_frozen_params():
    model = _Toy()
    optimizer = build_optimizer(model, OPTIM, torch.device("cpu"))
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.frozen.weight) not in params and id(model.frozen.bias) not in params
    assert optimizer.defaults["betas"] == (0.9, 0.999)
