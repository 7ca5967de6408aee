"""The training loop with a tiny test-double task (accumulation, non-finite skips, logging) and
the real pretraining CLI (log.jsonl scalars, one-line config errors)."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from albef.config import load_config
from albef.data.datasets import BadDataError
from albef.data.synthetic import generate_corpus
from albef.dist import DistInfo
from albef.engine.trainer import PREEMPTED_EXIT_CODE, Trainer, TrainingError, seed_everything, train
from albef.pretrain import main
from albef.tasks.base import Task

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BATCH, DIM, QUEUE = 4, 6, 24


class ToyModel(nn.Module):
    """A linear encoder with a momentum copy and a feature queue, like ALBEF in miniature."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(DIM, DIM)
        self.encoder_m = nn.Linear(DIM, DIM).requires_grad_(False)
        self.encoder_m.load_state_dict(self.encoder.state_dict())
        self.register_buffer("queue", torch.randn(QUEUE, DIM))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.ema_calls, self.enqueued = 0, []

    def forward(self, x):
        return self.encoder(x), self.encoder_m(x).detach()

    @torch.no_grad()
    def momentum_update(self):
        self.ema_calls += 1
        for p, p_m in zip(self.encoder.parameters(), self.encoder_m.parameters()):
            p_m.lerp_(p, 0.5)

    @torch.no_grad()
    def enqueue(self, feats):
        self.enqueued.append(len(feats))
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + len(feats)] = feats
        self.queue_ptr[0] = (ptr + len(feats)) % QUEUE


class ToyTask(Task):
    """Random regression batches; `bad_steps` micro-batch calls return a NaN `loss_b`."""

    def __init__(self, batches_per_epoch=6, bad_calls=()):
        self.batches_per_epoch, self.bad_calls, self.calls = batches_per_epoch, set(bad_calls), 0

    def build_model(self, cfg):
        return ToyModel()

    def build_train_loader(self, cfg, dist, epoch, consumed):
        g = torch.Generator().manual_seed(epoch)
        batches = [{"images": torch.randn(BATCH, DIM, generator=g), "index": torch.arange(BATCH),
                    "skipped": {"decode": 1}} for _ in range(self.batches_per_epoch)]
        return batches[consumed // BATCH:], self.batches_per_epoch

    def forward_step(self, model, batch, alpha):
        feats, feats_m = model(batch["images"])
        loss_a = feats.pow(2).mean()
        loss_b = (feats - feats_m).abs().mean()
        if self.calls in self.bad_calls:
            loss_b = loss_b * float("nan")
        self.calls += 1
        return {"loss": loss_a + loss_b, "loss_a": loss_a, "loss_b": loss_b, "queue_update": (feats_m,)}

    def after_optimizer_step(self, model, outputs):
        model.momentum_update()
        model.enqueue(torch.cat([o["queue_update"][0] for o in outputs]))

    def find_unused_parameters(self, cfg):
        return False


def toy_config(tmp_path: Path, *overrides: str):
    return load_config(None, [
        f"output_dir={tmp_path}", "train.batch_size=4", "train.epochs=1", "train.log_every=1",
        "train.ckpt_every=100", "optim.warmup_steps=0", "optim.lr=0.1", "data.max_bad_fraction=1.0",
        *overrides])


def read_log(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_accumulation_updates_ema_and_queue_once_per_optimizer_step(tmp_path):
    trainer = Trainer(toy_config(tmp_path, "train.grad_accum=2"), ToyTask(batches_per_epoch=7), CPU)
    assert trainer.fit() == 0
    assert trainer.state.step == 3  # 7 micro-batches -> 3 full accumulation groups
    assert trainer.model.ema_calls == 3
    assert trainer.model.enqueued == [2 * BATCH] * 3
    assert trainer.task.calls == 6
    assert (tmp_path / "checkpoints" / "step_00000003.pt").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_nonfinite_step_is_skipped_without_touching_state(tmp_path):
    seed_everything(toy_config(tmp_path).seed)
    initial = ToyModel().state_dict()
    trainer = Trainer(toy_config(tmp_path, "train.max_steps=1"), ToyTask(bad_calls={0}), CPU)
    assert trainer.fit() == 0
    after = trainer.model.state_dict()
    for key in ("encoder.weight", "encoder_m.weight", "queue", "queue_ptr"):
        assert torch.equal(after[key], initial[key]), key
    assert trainer.model.ema_calls == 0 and trainer.model.enqueued == []
    assert trainer.optimizer.state_dict()["state"] == {}
    records = read_log(tmp_path)
    assert any(r.get("event") == "nonfinite_skip" and r["terms"] == "loss_b" for r in records)
    assert [r["skipped_steps"] for r in records if "skipped_steps" in r] == [1]


def test_training_continues_after_an_isolated_nonfinite_step(tmp_path):
    trainer = Trainer(toy_config(tmp_path, "train.max_steps=3"), ToyTask(bad_calls={1}), CPU)
    assert trainer.fit() == 0
    assert trainer.model.ema_calls == 2
    assert trainer.state.nonfinite_steps == 1
    steps = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["skipped_steps"] for r in steps] == [0, 1]  # the skipped step logs no losses
    assert all(r["loss"] == r["loss"] for r in steps)  # no NaN leaked into the averages


def test_consecutive_nonfinite_steps_stop_naming_the_term(tmp_path):
    cfg = toy_config(tmp_path, "train.max_nonfinite=3")
    with pytest.raises(TrainingError, match=r"non-finite loss_b for 3 consecutive steps"):
        train(cfg, ToyTask(bad_calls=range(100)), CPU)


def test_preemption_signal_saves_and_exits_with_distinct_code(tmp_path, monkeypatch):
    task = ToyTask()
    forward = task.forward_step

    def forward_then_signal(model, batch, alpha):
        if task.calls == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step; honoured at the step's end
        return forward(model, batch, alpha)

    monkeypatch.setattr(task, "forward_step", forward_then_signal)
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = Trainer(toy_config(tmp_path), task, CPU)
    assert trainer.fit() == PREEMPTED_EXIT_CODE == 75
    assert trainer.state.step == 2 and trainer.model.ema_calls == 2
    assert (tmp_path / "checkpoints" / "step_00000002.pt").is_file()
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored

    resumed = Trainer(toy_config(tmp_path), ToyTask(), CPU, resume="auto")
    assert resumed.state.step == 2 and resumed.fit() == 0 and resumed.state.step == 6


def test_skipped_samples_are_counted_and_bad_fraction_stops(tmp_path):
    trainer = Trainer(toy_config(tmp_path), ToyTask(), CPU)
    trainer.fit()
    assert dict(trainer.skips.counts) == {"decode": 6} and trainer.skips.seen == 30
    with pytest.raises(BadDataError, match="decode=6"):
        train(toy_config(tmp_path / "strict", "data.max_bad_fraction=0.01"), ToyTask(), CPU)


def test_pretrain_cli_logs_every_scalar(tmp_path, capsys):
    corpus = generate_corpus(str(tmp_path / "corpus"), num_train=8, num_test=2, image_size=32)
    out = tmp_path / "run"
    code = main([
        "--config", str(CONFIG), "--output-dir", str(out), f"data.train_files=[{corpus['train']}]",
        f"data.image_root={corpus['image_root']}", f"model.text.bert={corpus['bert']}",
        "train.batch_size=4", "train.max_steps=2", "train.log_every=1",
    ])
    assert code == 0
    records = [r for r in read_log(out) if "event" not in r]
    assert [r["step"] for r in records] == [1, 2]
    for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "itc_ce", "itc_kl", "itc_entropy", "lr",
                 "alpha", "temp", "grad_norm", "images_per_s", "data_wait_fraction", "skipped_steps"):
        assert name in records[-1], name
    assert records[0]["lr"] == pytest.approx(1e-5)  # warmup_lr at step 0
    assert (out / "checkpoints" / "step_00000002.pt").is_file()
    assert "step 2/2" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--config", "no/such/config.yaml"],
    ["--config", str(CONFIG), "train.batch_sise=4"],
    ["--config", str(CONFIG), "data.train_files=[missing.json]"],
    ["--config", str(CONFIG), "--resume", "no/such/checkpoint.pt"],
    ["--bogus-flag"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
