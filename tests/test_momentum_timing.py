"""The engine's momentum (EMA) timing is ALBEF's: `momentum_update()` runs once per optimizer step,
right before the step's first forward, the first step included (ALBEF calls `_momentum_update()`
inside its forward, just before the momentum encoders run)."""

import copy

import pytest
import torch

from albef.checkpoint import save_pretrained
from albef.dist import DistInfo
from albef.engine.trainer import Trainer, seed_everything
from albef.tasks.pretrain import PretrainTask
from conftest import pretrain_config, tiny_corpus

pytestmark = pytest.mark.slow  # real training steps from a checkpoint

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _checkpoint_with_distinct_momentum(tmp_path, cfg):
    """A pretraining weight file whose momentum copies differ from its online weights."""
    seed_everything(0)
    model = PretrainTask().build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".", 1)[0].endswith("_m"):
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "distinct_momentum.pt"
    save_pretrained(model, path, cfg.to_dict())
    return path


@pytest.mark.parametrize("accum", [1, 2])
def test_first_step_momentum_features_follow_one_ema(tmp_path, accum):
    corpus = tiny_corpus(tmp_path / "corpus", num_train=8)
    cfg = pretrain_config(corpus, tmp_path / "run", "train.max_steps=1", "train.batch_size=4",
                          f"train.grad_accum={accum}", "train.async_checkpoint=false", "eval.val_files=[]",
                          "model.text.config_overrides={hidden_size: 32, num_attention_heads: 2, "
                          "intermediate_size: 64}", "model.vision.embed_dim=32", "model.vision.depth=1")
    path = _checkpoint_with_distinct_momentum(tmp_path, cfg)
    trainer = Trainer(cfg, PretrainTask(), CPU, init_from=str(path))
    loaded = copy.deepcopy(trainer.model)  # the weights the first step starts from
    assert not torch.equal(loaded.vision_proj.weight, loaded.vision_proj_m.weight)

    seen = []  # (images into the momentum ViT, momentum image features) of every micro-batch
    model = trainer.model
    model.visual_encoder_m.register_forward_hook(lambda m, args, out: seen.append([args[0].clone()]))
    model.vision_proj_m.register_forward_hook(lambda m, args, out: seen[-1].append(out.clone()))
    assert trainer.fit() == 0
    assert len(seen) == accum  # every micro-batch ran the momentum model

    expected = copy.deepcopy(loaded)
    expected.momentum_update()  # ALBEF: the EMA, then the momentum forward
    with torch.no_grad():
        for images, feats_m in seen:  # every micro-batch of the step: one EMA, not one per micro-batch
            embeds_m = expected.visual_encoder_m(images)
            assert torch.equal(feats_m, expected.vision_proj_m(embeds_m[:, 0, :]))
            stale = loaded.vision_proj_m(loaded.visual_encoder_m(images)[:, 0, :])
            assert not torch.allclose(feats_m, stale)  # the EMA after the optimizer step would give these
    # the step's single EMA moved the copies (the next one runs before the next step's forward)
    for name, p in trainer.model.named_parameters():
        if name.startswith("vision_proj_m."):
            assert torch.equal(p, dict(expected.named_parameters())[name]), name
