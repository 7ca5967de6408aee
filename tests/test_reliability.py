"""Reliability through real `python -m albef.pretrain` processes: hard kills (also in the middle of
a checkpoint write), preemption, broken data, a non-finite loss term and untrusted checkpoints.

Process start-up dominates the cost, so the interrupted run is one chain of processes on one
output directory, compared bit for bit with one uninterrupted reference run.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef import cli, pretrain
from albef.checkpoint import find_latest, load_checkpoint_file
from albef.data.synthetic import generate_corpus
from albef.engine.trainer import PREEMPTED_EXIT_CODE
from albef.models.momentum import momentum_update
from conftest import assert_same

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 10  # 6 steps per epoch: the chain crosses an epoch boundary
TIMEOUT = 180

# A child that installs `PATCH` (a fault) and then runs the CLI with the given arguments.
CHILD = """
import os, signal, sys
import torch
from albef import pretrain
{patch}
sys.exit(pretrain.main(sys.argv[1:]))
"""

DIE_WRITING_STEP = """
import io
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("train_state", {{}}).get("step") == {step}:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)
torch.save = save
"""

DIE_BEFORE_POINTER = """
real_replace = os.replace
def replace(src, dst):
    if os.path.basename(dst) == "latest" and open(src).read().strip() == "step_{step:08d}.pt":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
"""

NAN_ITM_AT_CALL = """
import albef.models.albef as albef_model
real_itm_loss, calls = albef_model.itm_loss, [0]
def itm_loss(*args, **kwargs):
    calls[0] += 1
    loss = real_itm_loss(*args, **kwargs)
    return loss * float("nan") if calls[0] == {call} else loss
albef_model.itm_loss = itm_loss
"""


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def no_stray_processes():
    yield
    for run in Run.started:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 12 images x 2 captions = 24 samples = 6 steps of 4
    return generate_corpus(str(tmp_path_factory.mktemp("corpus")), num_train=12, num_test=1,
                           image_size=32, captions_per_image=2)


def cli_args(corpus, output_dir: Path, *overrides: str, train_files: str | None = None) -> list[str]:
    return [
        "--config", str(CONFIG), "--output-dir", str(output_dir), "--resume", "auto",
        f"data.train_files=[{train_files or corpus['train']}]", f"data.image_root={corpus['image_root']}",
        f"model.text.bert={corpus['bert']}", "data.num_workers=0", "train.precision=fp32",
        "train.batch_size=4", "train.epochs=2", f"train.max_steps={TOTAL_STEPS}", "train.log_every=1",
        "train.ckpt_every=1", "train.keep_last=1", *overrides,
    ]


class Run:
    """One CLI process; stdout and stderr go to a file next to the run directory."""

    started: list["Run"] = []

    def __init__(self, args: list[str], output_dir: Path, patch: str | None = None) -> None:
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        self.log_offset = self._log_size()
        self.console = output_dir.parent / f"{output_dir.name}.{time.monotonic_ns()}.out"
        command = [sys.executable, "-m", "albef.pretrain"] if patch is None else \
            [sys.executable, "-c", CHILD.format(patch=patch)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(command + args, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        Run.started.append(self)

    def _log_size(self) -> int:
        log = self.output_dir / "log.jsonl"
        return log.stat().st_size if log.exists() else 0

    def records(self) -> list[dict]:
        """log.jsonl lines this process wrote (complete lines only)."""
        log = self.output_dir / "log.jsonl"
        if not log.exists():
            return []
        with open(log, "rb") as f:
            f.seek(self.log_offset)
            lines = f.read().split(b"\n")[:-1]
        return [json.loads(line) for line in lines]

    def steps(self) -> list[int]:
        return [r["step"] for r in self.records() if "event" not in r]

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def wait(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"run did not finish:\n{self.output()[-3000:]}") from None

    def signal_after_step(self, step: int, signum: int, group: bool = False) -> int:
        """Send `signum` (to the process, or its whole process group as a scheduler does) as
        soon as log.jsonl shows `step`; returns the exit status."""
        deadline = time.monotonic() + TIMEOUT
        while not any(s >= step for s in self.steps()):
            assert self.proc.poll() is None, f"run ended early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no step {step}:\n{self.output()[-3000:]}"
            time.sleep(0.005)
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        return self.wait()


def run_to_end(args: list[str], output_dir: Path, patch: str | None = None) -> Run:
    run = Run(args, output_dir, patch)
    code = run.wait()
    assert code == 0, run.output()[-3000:]
    return run


def ckpt_names(output_dir: Path) -> set[str]:
    return {p.name for p in (output_dir / "checkpoints").iterdir()}


def step_files(output_dir: Path) -> set[str]:
    return {n for n in ckpt_names(output_dir) if n.startswith("step_")}


def latest_step(output_dir: Path) -> int:
    return load_checkpoint_file(find_latest(output_dir / "checkpoints"))["train_state"]["step"]


def resumed_step(run: Run) -> int:
    (line,) = [line for line in run.output().splitlines() if line.startswith("resumed from")]
    return int(line.rsplit("step ", 1)[1].rstrip(")"))


# ----------------------------------------------------------------------------- kills and preemption


def test_killed_and_preempted_run_resumes_exactly(corpus, tmp_path):
    reference_dir, out = tmp_path / "reference", tmp_path / "interrupted"
    reference = Run(cli_args(corpus, reference_dir, "train.ckpt_every=100"), reference_dir)

    # 1. SIGKILL half-way through writing step 3: the temp file is left, never picked.
    killed = Run(cli_args(corpus, out), out, DIE_WRITING_STEP.format(step=3))
    assert killed.wait() == -signal.SIGKILL
    names = ckpt_names(out)
    assert any(n.startswith(".step_00000003.pt.") and n.endswith(".tmp") for n in names), names
    assert step_files(out) == {"step_00000002.pt"}  # keep_last=1 kept the only good one
    assert latest_step(out) == 2

    # 2. SIGKILL after step 4 was renamed into place but before `latest` moved on.
    killed = Run(cli_args(corpus, out), out, DIE_BEFORE_POINTER.format(step=4))
    assert killed.wait() == -signal.SIGKILL
    # (train.async_checkpoint: step 5 may train and log while step 4 is written; it is not saved)
    assert resumed_step(killed) == 2 and killed.steps() in ([3, 4], [3, 4, 5])
    assert not any(n.startswith(".step_00000003.pt.") for n in ckpt_names(out)), "stale temp file"
    assert step_files(out) == {"step_00000003.pt", "step_00000004.pt"}
    assert latest_step(out) == 3

    # 3. SIGTERM to the process group (data workers included) once a step is logged: exit 75
    #    with exactly one new checkpoint, the one `latest` names.
    before = step_files(out)
    preempted = Run(cli_args(corpus, out, "train.ckpt_every=100", "data.num_workers=1"), out)
    code = preempted.signal_after_step(4, signal.SIGTERM, group=True)
    assert code == PREEMPTED_EXIT_CODE, preempted.output()[-3000:]
    new = step_files(out) - before
    assert len(new) == 1, new
    stop = latest_step(out)
    assert new == {f"step_{stop:08d}.pt"} and preempted.steps()[-1] == stop >= 5
    assert preempted.steps() == list(range(4, stop + 1))
    assert [r["exit_code"] for r in preempted.records() if r.get("event") == "preempted"] == [75]

    # 4. SIGKILL from outside right after a step is logged (typically inside its checkpoint write).
    killed = Run(cli_args(corpus, out), out)
    assert killed.signal_after_step(stop + 1, signal.SIGKILL) == -signal.SIGKILL
    assert resumed_step(killed) == stop

    # 5. Resume to the end and compare with the uninterrupted run.
    last = run_to_end(cli_args(corpus, out), out)
    start = resumed_step(last)
    assert stop <= start and last.steps() == list(range(start + 1, TOTAL_STEPS + 1))
    assert reference.wait() == 0, reference.output()[-3000:]
    assert not [n for n in ckpt_names(out) if n.endswith(".tmp")]
    assert step_files(out) == {f"step_{TOTAL_STEPS:08d}.pt"}

    final, expected = (load_checkpoint_file(d / "checkpoints" / f"step_{TOTAL_STEPS:08d}.pt")
                       for d in (out, reference_dir))
    for key in ("visual_encoder_m.cls_token", "text_encoder_m.bert.embeddings.word_embeddings.weight",
                "image_queue", "text_queue", "idx_queue", "queue_ptr"):
        assert key in final["model"], key
    assert int(final["model"]["queue_ptr"]) != 0
    for key in ("model", "optimizer", "train_state", "rng", "skips"):
        assert_same(final[key], expected[key], key)


# ----------------------------------------------------------------------------- bad data


def _image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def broken_corpus(corpus, tmp_path_factory):
    """24 samples: 15 good, 4 in odd image modes (to be converted) and one of each broken kind."""
    root = Path(corpus["image_root"])
    good = json.loads(Path(corpus["train"]).read_text())
    jpeg = (root / good[0]["image"]).read_bytes()
    odd = root / "odd"
    odd.mkdir(exist_ok=True)
    grey16 = Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))
    files = {
        "zero.jpg": b"",
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "garbage.jpg": bytes(range(256)) * 4,
        "cmyk.jpg": _image_bytes(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"),
        "palette.png": _image_bytes(Image.new("P", (32, 32), 3), "PNG"),
        "grey16.png": _image_bytes(grey16, "PNG"),
        "grey.jpg": _image_bytes(Image.new("L", (32, 32), 100), "JPEG"),
    }
    for name, data in files.items():
        (odd / name).write_bytes(data)
    caption = "a red square on the left"
    entries = [{"image": e["image"], "caption": e["caption"][0]} for e in good]  # 12 good
    entries += [{"image": good[i]["image"], "caption": good[i]["caption"][1]} for i in range(3)]
    entries += [{"image": f"odd/{name}", "caption": caption}
                for name in ("cmyk.jpg", "palette.png", "grey16.png", "grey.jpg")]
    entries += [{"image": f"odd/{name}", "caption": caption}
                for name in ("missing.jpg", "zero.jpg", "cut.jpg", "garbage.jpg")]
    entries.append({"image": good[0]["image"], "caption": " ?! "})
    assert len(entries) == 24
    path = tmp_path_factory.mktemp("broken") / "train.json"
    path.write_text(json.dumps(entries))
    return str(path)


EXPECTED_SKIPS = "decode=1 empty_caption=1 empty_file=1 missing=1 truncated=1"


@pytest.fixture(scope="module")
def bad_data_runs(corpus, broken_corpus, tmp_path_factory):
    """Both runs on the broken corpus, started together: one within the bound, one over it."""
    lenient, strict = (tmp_path_factory.mktemp(name) / "run" for name in ("lenient", "strict"))
    return {
        "lenient": Run(cli_args(corpus, lenient, "train.epochs=1", "data.max_bad_fraction=0.25",
                                train_files=broken_corpus), lenient),
        "strict": Run(cli_args(corpus, strict, "data.max_bad_fraction=0.1", train_files=broken_corpus),
                      strict),
    }


def test_broken_samples_are_counted_per_reason_and_training_finishes(bad_data_runs):
    run = bad_data_runs["lenient"]
    assert run.wait() == 0, run.output()[-3000:]
    assert run.steps() == list(range(1, 7))
    (event,) = [r for r in run.records() if r.get("event") == "bad_samples"]
    assert event["report"] == f"skipped 5/24 samples (20.83%): {EXPECTED_SKIPS}"
    assert EXPECTED_SKIPS in run.output()
    final = [r for r in run.records() if "event" not in r][-1]
    assert final["skipped_samples"] == 5  # odd image modes were converted, not dropped


def test_too_much_bad_data_stops_after_saving_the_epoch(bad_data_runs):
    run = bad_data_runs["strict"]
    assert run.wait() == 1, run.output()[-3000:]
    errors = [line for line in run.output().splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: 5 of 24 samples (20.83%) were unusable ({EXPECTED_SKIPS.replace(' ', ', ')}), "
        "above data.max_bad_fraction=0.1; fix or remove the bad files, or raise the bound"]
    assert "Traceback" not in run.output()
    assert step_files(run.output_dir) == {"step_00000006.pt"} and latest_step(run.output_dir) == 6


# ----------------------------------------------------------------------------- bad numbers


def test_nonfinite_loss_term_skips_the_step_without_touching_state(corpus, tmp_path):
    out = tmp_path / "run"
    args = cli_args(corpus, out, "train.max_steps=3", "train.keep_last=5")
    run = run_to_end(args, out, NAN_ITM_AT_CALL.format(call=2))
    assert [r["terms"] for r in run.records() if r.get("event") == "nonfinite_skip"] == ["loss_itm"]
    assert "nonfinite_skip: terms=loss_itm" in run.output()
    assert [r["skipped_steps"] for r in run.records() if "event" not in r] == [0, 1, 1]
    before, after, later = (load_checkpoint_file(out / "checkpoints" / f"step_{s:08d}.pt") for s in (1, 2, 3))
    assert after["train_state"]["nonfinite_steps"] == 1 and after["train_state"]["step"] == 2
    # weights and queues untouched; the momentum weights took the one EMA that runs before every
    # step's forward (ALBEF's timing), towards the unchanged online weights
    momentum = {k for k in before["model"] if k.split(".", 1)[0].endswith("_m")}
    assert momentum
    assert_same({k: v for k, v in after["model"].items() if k not in momentum},
                {k: v for k, v in before["model"].items() if k not in momentum}, "model")
    expected = {k: before["model"][k].clone() for k in sorted(momentum)}
    momentum_update([before["model"][k.replace("_m.", ".", 1)] for k in expected], list(expected.values()),
                    before["config"]["model"]["momentum"])
    assert_same({k: after["model"][k] for k in expected}, expected, "model")
    assert_same(after["optimizer"]["state"], before["optimizer"]["state"], "optimizer")
    assert not torch.equal(later["model"]["queue_ptr"], after["model"]["queue_ptr"])  # step 3 trained


# ----------------------------------------------------------------------------- bad arguments


@pytest.fixture
def no_training(monkeypatch):
    """Make starting a process group or building the task a test failure."""
    def forbidden(*args, **kwargs):
        raise AssertionError("reached process-group / data setup")

    monkeypatch.setattr(cli, "init_distributed", forbidden)
    monkeypatch.setattr(pretrain.PretrainTask, "__init__", forbidden)  # building the task


@pytest.mark.parametrize("extra", [
    ["train.precision=fp8"], ["train.keep_last=0"], ["data.image_root=/no/such/dir"],
    ["--resume", "/no/such/step.pt"], ["--resume"],
])
def test_bad_arguments_exit_2_before_any_setup(corpus, tmp_path, capsys, no_training, extra):
    argv = cli_args(corpus, tmp_path)
    del argv[argv.index("--resume"):argv.index("--resume") + 2]
    assert pretrain.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["pickled code", "truncated"])
def test_untrusted_or_damaged_resume_checkpoint_is_refused_in_one_line(corpus, tmp_path, capsys, kind):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pt"
    if kind == "pickled code":
        torch.save({"model": {}, "payload": _Payload(marker)}, bad)
    else:
        torch.save({"model": {"w": torch.zeros(1000)}}, bad)
        bad.write_bytes(bad.read_bytes()[:500])
    argv = cli_args(corpus, tmp_path / "run")
    argv[argv.index("auto")] = str(bad)
    assert pretrain.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1, err
    assert not marker.exists()
