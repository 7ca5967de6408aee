"""A real 2-process gloo run of `python -m albef.pretrain` under torchrun on the CPU."""

import json
from pathlib import Path

import torch

from albef.data.synthetic import generate_corpus
from conftest import run_torchrun
import pytest

pytestmark = pytest.mark.distributed

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"


def test_two_process_pretraining_end_to_end(tmp_path):
    # 8 images x 2 captions = 16 samples = 2 steps of 2 ranks x 4 per epoch; 3 steps cross an epoch
    corpus = generate_corpus(str(tmp_path / "corpus"), num_train=8, num_test=2, image_size=32)
    out = tmp_path / "run"
    stdout, _ = run_torchrun([
        "-m", "albef.pretrain", "--config", str(CONFIG), "--output-dir", str(out),
        f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
        f"model.text.bert={corpus['bert']}", "train.batch_size=4", "train.epochs=2",
        "train.max_steps=3", "train.log_every=1",
    ])

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3]  # rank 0 only
    assert stdout.count("step 3/3") == 1

    checkpoint = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert checkpoint["train_state"] == {"epoch": 1, "step": 3, "consumed": 8, "nonfinite_steps": 0,
                                         "best_metric": None, "best_epoch": None, "evaluated_step": None,
                                         "pending_eval": None}  # pending_eval: a stop during evaluation
    assert len(checkpoint["rng"]) == 2  # every rank's RNG state
    assert (out / "checkpoints" / "step_00000002.pt").is_file()  # end of epoch 0
    assert (out / "config.yaml").is_file()
