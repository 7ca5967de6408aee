"""train.async_checkpoint: the state is staged to CPU and written in a background thread; the
files must be those a synchronous save writes, and training may change the model meanwhile."""
import threading

import torch
from conftest import assert_same
from test_trainer import CPU, ToyTask, toy_config
from torch import nn

from albef.checkpoint import CheckpointError, CheckpointWriter, load_checkpoint_file, save_checkpoint, stage_to_cpu
from albef.engine.trainer import Trainer
import pytest

pytestmark = pytest.mark.slow


def _steps(ckpt_dir):
    return sorted(p.name for p in ckpt_dir.glob("step_*.pt"))


def test_async_and_sync_runs_write_the_same_checkpoints(tmp_path):
    runs = {}
    for mode in ("true", "false"):
        out = tmp_path / mode
        cfg = toy_config(out, "train.ckpt_every=1", "train.keep_last=100", f"train.async_checkpoint={mode}")
        assert Trainer(cfg, ToyTask(batches_per_epoch=5), CPU).fit() == 0
        runs[mode] = out / "checkpoints"
    names = _steps(runs["true"])
    assert names == _steps(runs["false"]) == [f"step_{s:08d}.pt" for s in range(1, 6)]
    assert (runs["true"] / "latest").read_text() == (runs["false"] / "latest").read_text() == "step_00000005.pt\n"
    assert not [p for p in runs["true"].iterdir() if p.name.endswith(".tmp")]
    for name in names:
        written, expected = (load_checkpoint_file(runs[m] / name) for m in ("true", "false"))
        written["config"]["output_dir"] = expected["config"]["output_dir"]
        written["config"]["train"]["async_checkpoint"] = False
        assert_same(written, expected, name)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def test_background_write_keeps_the_state_of_the_save_call(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.head(model.embed(torch.arange(3))).sum().backward()
    optimizer.step()
    state = lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),  # noqa: E731
                     "train_state": {"step": 7, "epoch": 1}, "rng": [torch.get_rng_state()]}
    save_checkpoint(state(), tmp_path / "sync", 7, keep_last=1)
    trained_on, real_save = threading.Event(), torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: trained_on.wait(10) and real_save(*a, **k))
    writer = CheckpointWriter()
    path = writer.save(state(), tmp_path / "async", 7, keep_last=1)
    with torch.no_grad():  # training goes on while the file is written
        model.embed.weight.add_(1.0)
        model.queue_ptr += 5
    optimizer.step()
    trained_on.set()
    writer.wait()
    written, expected = load_checkpoint_file(path), load_checkpoint_file(tmp_path / "sync" / "step_00000007.pt")
    assert_same(written, expected)
    # tied weights still share one storage, as in a synchronous save
    assert written["model"]["embed.weight"].data_ptr() == written["model"]["head.weight"].data_ptr()
    assert (tmp_path / "async" / "latest").read_text() == "step_00000007.pt\n"


def test_stage_to_cpu_copies_and_keeps_views():
    base = torch.arange(12.0)
    staged = stage_to_cpu({"a": base, "b": [base[2:6].view(2, 2), (1, "x")], "n": None})
    base.zero_()
    assert torch.equal(staged["a"], torch.arange(12.0))
    assert torch.equal(staged["b"][0], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert staged["b"][0].untyped_storage().data_ptr() == staged["a"].untyped_storage().data_ptr()
    assert staged["b"][1] == (1, "x") and staged["n"] is None


def test_failed_background_write_is_raised_by_wait(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    writer = CheckpointWriter()
    writer.save({"x": torch.ones(2)}, blocker / "ckpt", 1, keep_last=1)
    try:
        writer.wait()
    except CheckpointError as err:
        assert "not_a_dir" in str(err)
    else:
        raise AssertionError("the failed write was not reported")
    writer.wait()  # reported once


def test_stage_to_cpu_reuses_buffers_of_the_previous_copy():
    state = {"w": torch.arange(6.0), "v": torch.ones(3)}
    buffers = []
    first = stage_to_cpu(state, buffers)
    pointers = [b.data_ptr() for b in buffers]
    state["w"] += 10
    state["v"] = torch.ones(4)  # another size: a new buffer
    second = stage_to_cpu(state, buffers)
    assert buffers[0].data_ptr() == pointers[0] and second["w"].data_ptr() == pointers[0]
    assert torch.equal(second["w"], torch.arange(6.0) + 10) and torch.equal(second["v"], torch.ones(4))
    assert len(buffers) == 2 and buffers[1].nbytes() == 16
    assert torch.equal(first["w"], second["w"])  # the same memory: the first copy is no longer valid
