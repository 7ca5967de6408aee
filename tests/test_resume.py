"""Resume is exact: stopping and resuming gives bit-identical weights, momentum weights, queues
and optimizer state to a straight run, also across an epoch boundary (real ALBEF, tiny corpus)."""

from pathlib import Path

import pytest
import torch

from albef.config import load_config
from albef.data.synthetic import generate_corpus
from albef.dist import DistInfo
from albef.engine.trainer import Trainer
from albef.tasks.pretrain import PretrainTask
from conftest import assert_same

pytestmark = pytest.mark.slow

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 12 images x 2 captions = 24 samples = 6 steps of 4 per epoch
    return generate_corpus(str(tmp_path_factory.mktemp("corpus")), num_train=12, num_test=2,
                           image_size=32, captions_per_image=2)


def run(corpus, output_dir, max_steps, resume=None, batch_size=4) -> Trainer:
    cfg = load_config(str(CONFIG), [
        f"output_dir={output_dir}", f"data.train_files=[{corpus['train']}]",
        f"data.image_root={corpus['image_root']}", f"model.text.bert={corpus['bert']}",
        f"train.batch_size={batch_size}", "train.epochs=3", f"train.max_steps={max_steps}",
        "train.log_every=100", "train.ckpt_every=100", "data.num_workers=0",
    ])
    torch.manual_seed(1234)  # the trainer must not depend on the caller's RNG
    trainer = Trainer(cfg, PretrainTask(), CPU, resume=resume)
    assert trainer.fit() == 0
    return trainer


def test_resume_mid_epoch_and_at_epoch_end_is_exact(corpus, tmp_path):
    straight = run(corpus, tmp_path / "straight", max_steps=8)
    assert straight.state.epoch == 1 and straight.state.step == 8

    run(corpus, tmp_path / "stopped", max_steps=3)  # stops mid-epoch 0
    at_boundary = run(corpus, tmp_path / "stopped", max_steps=6, resume="auto")  # ends epoch 0
    assert (at_boundary.state.epoch, at_boundary.state.consumed) == (1, 0)
    resumed = run(corpus, tmp_path / "stopped", max_steps=8, resume="auto")  # into epoch 1

    assert vars(resumed.state) == vars(straight.state)
    model, reference = resumed.model.state_dict(), straight.model.state_dict()
    for key in ("visual_encoder_m.cls_token", "text_proj_m.weight", "image_queue", "idx_queue", "queue_ptr"):
        assert key in model
    assert int(model["queue_ptr"]) != 0
    assert_same(model, reference, "model")
    assert_same(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optimizer")


def test_resume_with_a_larger_batch_finishes_the_epoch_without_running_dry(corpus, tmp_path):
    """20 of the epoch's 24 samples were consumed at batch 4; at batch 8 less than one step is
    left, so the resumed run starts the next epoch instead of asking the loader for more."""
    run(corpus, tmp_path / "run", max_steps=5)
    resumed = run(corpus, tmp_path / "run", max_steps=7, resume="auto", batch_size=8)
    assert (resumed.state.epoch, resumed.state.step, resumed.state.consumed) == (1, 7, 16)


def test_resuming_with_another_architecture_fails_in_one_line(corpus, tmp_path):
    from albef.checkpoint import CheckpointError

    run(corpus, tmp_path / "run", max_steps=1)
    cfg = load_config(str(CONFIG), [
        f"output_dir={tmp_path / 'run'}", f"data.train_files=[{corpus['train']}]",
        f"data.image_root={corpus['image_root']}", f"model.text.bert={corpus['bert']}",
        "model.embed_dim=48", "data.num_workers=0",
    ])
    with pytest.raises(CheckpointError) as info:
        Trainer(cfg, PretrainTask(), CPU, resume="auto")
    message = str(info.value)
    assert "\n" not in message and "does not fit this model" in message
    assert ": checkpoint [" in message and "model [48" in message and "config.yaml" in message
