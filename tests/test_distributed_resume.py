"""Multi-rank resume and logging honesty, with real gloo processes: ranks that would resume
different checkpoints stop in one line; the logged loss terms are means over the ranks; a
WebDataset checkpoint resumed mid-epoch at another layout is refused in one line.

The 2-rank part runs this file as a torchrun script (`worker`).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef.config import ConfigError
from albef.dist import DistInfo
from albef.engine.trainer import Trainer
from albef.tasks.pretrain import PretrainTask
from conftest import pretrain_config, run_torchrun, tiny_corpus

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "test_tiny.yaml"
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

# Node-local output directories: the same --output-dir text names another directory per rank.
NODE_LOCAL_CLI = """
import os, sys
from albef import pretrain
sys.exit(pretrain.main([a.replace("NODE", os.environ["RANK"]) for a in sys.argv[1:]]))
"""


class RecordingTask(PretrainTask):
    """PretrainTask that keeps this rank's own loss terms of every micro-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, float]] = []

    def forward_step(self, model, batch, alpha):
        out = super().forward_step(model, batch, alpha)
        self.seen.append({k: float(v) for k, v in out.items() if k.startswith("loss")})
        return out


def worker(corpus_json: str, out: str) -> None:
    """torchrun entry: 3 logged steps on 2 ranks; each rank saves its own loss terms."""
    from albef.dist import destroy_distributed, init_distributed

    dist = init_distributed()
    cfg = pretrain_config(json.loads(corpus_json), Path(out), "train.batch_size=2", "train.max_steps=3",
                          "train.log_every=1")
    task = RecordingTask()
    Trainer(cfg, task, dist).fit()
    (Path(out) / f"rank{dist.rank}.json").write_text(json.dumps(task.seen))
    destroy_distributed()


def logged(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "event" not in r]


def test_logged_loss_terms_are_means_over_ranks(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus", num_train=8)
    out = tmp_path / "run"
    run_torchrun([__file__, json.dumps(corpus), str(out)])
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    records = logged(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record, rank0, rank1 in zip(records, *per_rank):
        for term in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert record[term] == pytest.approx((rank0[term] + rank1[term]) / 2, rel=1e-5), term
        assert rank0["loss"] != pytest.approx(rank1["loss"], rel=1e-3)  # the mean is not rank 0's value


def _fake_checkpoint(ckpt_dir: Path, step: int) -> None:
    ckpt_dir.mkdir(parents=True)
    torch.save({"train_state": {"step": step}}, ckpt_dir / f"step_{step:08d}.pt")
    (ckpt_dir / "latest").write_text(f"step_{step:08d}.pt\n")


def test_ranks_resuming_different_steps_stop_in_one_line(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus", num_train=8)
    _fake_checkpoint(tmp_path / "node0" / "checkpoints", 4)
    _fake_checkpoint(tmp_path / "node1" / "checkpoints", 6)
    child = tmp_path / "node_local_cli.py"
    child.write_text(NODE_LOCAL_CLI)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(child),
           "--config", str(CONFIG), "--output-dir", str(tmp_path / "nodeNODE"), "--resume", "auto",
           f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
           f"model.text.bert={corpus['bert']}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, stderr[-4000:]  # one line from each rank, nothing else of ours
    assert all(e.startswith("error: ranks disagree on where to resume (rank 0: step 4; rank 1: step 6)")
               for e in errors), errors
    ours = [line for line in stderr.splitlines() if 'File "' in line and "albef" in line]
    assert not ours, stderr[-4000:]  # no traceback from the ranks (torchrun prints its own report)
    assert not (tmp_path / "node0" / "log.jsonl").exists()  # nothing trained


def test_webdataset_resumed_mid_epoch_at_another_worker_count_is_refused(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus", num_train=8)
    settings = ["data.format=wds", f"data.shards={corpus['shards']}", "data.num_samples=16",
                "train.batch_size=2", "train.max_steps=1", "train.ckpt_every=1"]
    Trainer(pretrain_config(corpus, tmp_path / "run", *settings), PretrainTask(), CPU).fit()
    same = Trainer(pretrain_config(corpus, tmp_path / "run", *settings), PretrainTask(), CPU, resume="auto")
    assert same.state.step == 1 and same.state.consumed == 2
    with pytest.raises(ConfigError, match=r"data.format=wds: .*2 samples into an epoch.*num_workers 0 -> 1"):
        Trainer(pretrain_config(corpus, tmp_path / "run", *settings, "data.num_workers=1"), PretrainTask(), CPU,
                resume="auto")


if __name__ == "__main__":
    worker(*sys.argv[1:])
