"""A stop signal during the per-epoch evaluation (issue 17): the evaluation is abandoned at the
next batch boundary, the checkpoint is written and the process exits 75 within seconds (not
when the evaluation would have ended); `--resume auto` runs that evaluation again and the run
ends with the results/*.json and best.pt of an uninterrupted run. Retrieval and VE."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from albef.data.synthetic import generate_corpus, generate_reasoning_sets
from conftest import TINY_YAML, assert_same

pytestmark = pytest.mark.slow  # signalled and resumed training runs

ROOT = Path(__file__).resolve().parents[1]
SLOW_S = 3.0  # each evaluation image after the signal takes this long: an unheeded stop waits many of them

# The CLI with one change: the K-th evaluation image this process transforms sends it SIGTERM (as
# a scheduler would), and every later one takes SLOW_S seconds.
CHILD = """
import os, signal, sys, time
import albef.data.transforms as transforms
_make, calls = transforms.eval_transform, [0]
def eval_transform(*args, **kwargs):
    inner = _make(*args, **kwargs)
    def transform(image):
        calls[0] += 1
        if calls[0] == int(os.environ["SIGNAL_AT"]):
            open(os.environ["SIGNAL_FILE"], "w").write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGTERM)
        elif calls[0] > int(os.environ["SIGNAL_AT"]):
            time.sleep(float(os.environ["SLOW_S"]))
        return inner(image)
    return transform
transforms.eval_transform = eval_transform
from albef.command import main
sys.exit(main(sys.argv[1:]))
"""


def launch(args: list[str], signal_file: Path | None = None, signal_at: int = 0) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if signal_file is not None:
        env.update(SIGNAL_FILE=str(signal_file), SIGNAL_AT=str(signal_at), SLOW_S=str(SLOW_S))
        command = [sys.executable, "-c", CHILD, *args]
    else:
        command = [sys.executable, "-m", "albef", *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, time.time()


def results(run: Path) -> dict[str, dict]:
    """results/*.json without the timings (wall clock)."""
    out = {}
    for path in sorted((run / "results").glob("*.json")):
        data = json.loads(path.read_text())
        out[path.name] = {k: v for k, v in data.items() if not k.startswith("time")}
    return out


def assert_same_best(a: Path, b: Path) -> None:
    first, second = (torch.load(p / "best.pt", weights_only=True) for p in (a, b))
    assert_same(first["model"], second["model"], "best.pt model")
    for cfg in (first["config"], second["config"]):
        cfg.pop("output_dir")
    assert first["config"] == second["config"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    corpus = generate_corpus(str(root / "corpus"), num_train=8, num_test=6, image_size=32, captions_per_image=2)
    sets = generate_reasoning_sets(str(root / "reasoning"), num_train=8, num_val=8, num_test=4, image_size=32)
    return {"corpus": corpus, "sets": sets, "test_json": str(Path(corpus["train"]).parent / "test.json")}


def task_args(task: str, data: dict, out: Path) -> list[str]:
    corpus, sets = data["corpus"], data["sets"]
    common = ["--config", str(TINY_YAML), "--output-dir", str(out), "--resume", "auto",
              f"model.text.bert={corpus['bert']}", "train.precision=fp32", "train.batch_size=4", "train.epochs=2",
              "train.max_steps=null", "eval.batch_size=1", "train.async_checkpoint=false"]
    if task == "retrieval":
        return ["retrieval", *common, f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
                f"eval.val_files=[{data['test_json']}]", f"eval.test_files=[{data['test_json']}]",
                f"eval.image_root={corpus['image_root']}", "loss.weights.mlm=0"]
    return [task, *common, f"data.train_files=[{sets[f'{task}_train']}]", f"data.image_root={sets['image_root']}",
            f"eval.val_files=[{sets[f'{task}_val']}]", f"eval.test_files=[{sets[f'{task}_test']}]",
            f"eval.image_root={sets['image_root']}"]


@pytest.mark.parametrize("task", ["retrieval", "ve"])
def test_sigterm_during_evaluation_exits_75_and_resume_matches_an_uninterrupted_run(task, data, tmp_path):
    whole = tmp_path / "whole"
    code, output, _ = launch(task_args(task, data, whole))
    assert code == 0, output[-3000:]

    run, signal_file = tmp_path / "interrupted", tmp_path / "signalled_at"
    code, output, ended = launch(task_args(task, data, run), signal_file, signal_at=2)
    assert code == 75, output[-3000:]
    assert "Traceback" not in output
    waited = ended - float(signal_file.read_text())
    assert waited < 2 * SLOW_S, f"exit {waited:.1f}s after the signal"  # not after the whole evaluation
    state = torch.load(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip(), weights_only=True)
    assert state["train_state"]["pending_eval"] == 0 and not (run / "best.pt").exists()

    code, output, _ = launch(task_args(task, data, run))
    assert code == 0, output[-3000:]
    assert results(whole) and results(run) == results(whole)
    assert_same_best(run, whole)
