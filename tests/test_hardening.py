"""Hardening of the fine-tuning entry points (issue 17), one test per kind of leak, each through
the command line or `albef.load` in a subprocess: the exit code, one `error:` line on stderr
without a traceback, nothing written outside the run directory.

Kinds: files read through a run directory stay inside it; no remote code from a model folder
(never a prompt); bounded model-config sizes; our one-line refusal for YAML/JSON we read; typed
REFER converter input; one exit code per kind of failure; data preflight before training.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each case runs the command line or albef.load in a subprocess

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "test_tiny.yaml"
NUM_TEST = 4


def snapshot(root: Path, skip: Path | None = None) -> set[str]:
    """Every path under `root` (files and dirs), except those under `skip`."""
    found = set()
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        found.add(str(path.relative_to(root)))
    return found


def run(args: list[str], cwd: Path, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd` with this checkout first on the path; stdin `None` means closed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, text=True, capture_output=True,
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit `code`, exactly one stderr line (`error: ...`) holding every needle, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from albef.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(str(out), num_train=8, num_test=NUM_TEST, image_size=32, captions_per_image=2)
    return out


@pytest.fixture(scope="module")
def weights(corpus, tmp_path_factory) -> Path:
    """best.pt of a tiny retrieval model (weights + config), as a run writes it."""
    from albef.checkpoint import save_pretrained
    from albef.config import load_config
    from albef.tasks.retrieval import RetrievalTask

    cfg = load_config(str(TINY), [f"model.text.bert={corpus / 'bert'}", "loss.weights.mlm=0",
                                  "model.vision.pretrained=false", "model.text.pretrained=false"])
    torch.manual_seed(0)
    model = RetrievalTask().build_model(cfg)
    return save_pretrained(model, tmp_path_factory.mktemp("weights") / "best.pt", cfg.to_dict())


def retrieval_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "albef", "retrieval", "--config", str(TINY), "--output-dir", str(out),
            f"model.text.bert={corpus / 'bert'}", f"data.train_files=[{corpus / 'train.json'}]",
            f"data.image_root={corpus}", f"eval.test_files=[{corpus / 'test.json'}]", f"eval.image_root={corpus}",
            "eval.val_files=[]", "loss.weights.mlm=0", "model.vision.pretrained=false",
            "model.text.pretrained=false", *extra]


LOAD = textwrap.dedent("""
    import sys
    import albef
    from albef.checkpoint import CheckpointError
    from albef.config import ConfigError
    try:
        albef.load(sys.argv[1])
    except (CheckpointError, ConfigError) as err:
        sys.stderr.write(f"error: {err}\\n")
        sys.exit(2)
""")


# ----------------------------------------------------------------------------- 1. confinement


@pytest.mark.parametrize("where", ["best.pt", "checkpoints/step_00000004.pt", "checkpoints"])
def test_a_link_out_of_the_run_directory_is_refused(where, weights, corpus, tmp_path):
    """A run directory whose best.pt, step file or checkpoints folder is a link to a place
    outside: `albef.load(RUN)` and `--evaluate --init-from RUN` refuse it in one line."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "step_00000004.pt").write_bytes(weights.read_bytes())
    run_dir = tmp_path / "downloaded_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    link = run_dir / where
    if where == "checkpoints":
        (run_dir / "checkpoints").rmdir()
        link.symlink_to(outside, target_is_directory=True)
    else:
        link.unlink(missing_ok=True)
        link.symlink_to(outside / "step_00000004.pt")
    before = snapshot(tmp_path)
    proc = run(["-c", LOAD, str(run_dir)], cwd=tmp_path)
    assert_one_line(proc, 2, "outside", str(run_dir))
    out = tmp_path / "eval_run"
    proc = run(retrieval_args(corpus, out, "--evaluate", "--init-from", str(run_dir)), cwd=tmp_path)
    # --init-from RUN reads the run's newest checkpoint (not best.pt): a linked best.pt is not read
    assert_one_line(proc, 2, *(["outside"] if where != "best.pt" else ["without step_"]))
    assert snapshot(tmp_path, skip=out) == before


def test_a_dcp_shard_linked_out_of_its_directory_is_refused(tmp_path):
    from albef.checkpoint import CheckpointError, check_dcp_directory
    from test_hostile_checkpoints import write_dcp

    path = write_dcp(tmp_path / "run" / "checkpoints" / "step_00000009.dcp")
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    (tmp_path / "elsewhere.distcp").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere.distcp")
    with pytest.raises(CheckpointError, match="outside"):
        check_dcp_directory(path)
    proc = run(["-c", LOAD, str(tmp_path / "run")], cwd=tmp_path)
    assert_one_line(proc, 2, "outside")


def test_a_latest_pointer_linked_out_is_refused(weights, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004.pt").write_bytes(weights.read_bytes())
    (tmp_path / "pointer").write_text("step_00000004.pt\n")
    (run_dir / "checkpoints" / "latest").symlink_to(tmp_path / "pointer")
    proc = run(["-c", LOAD, str(run_dir)], cwd=tmp_path)
    assert_one_line(proc, 2, "outside", "latest")


# ----------------------------------------------------------------------------- 2. no remote code


def remote_code_folder(corpus: Path, path: Path, marker: Path, where: str) -> Path:
    """A copy of the corpus BERT folder whose config.json or tokenizer_config.json asks for the
    folder's own Python code (`auto_map`); that code would create `marker`."""
    path.mkdir()
    for file in (corpus / "bert").iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (path / "evil_tokenizer.py").write_text(code + "from transformers import BertTokenizer\n"
                                            "class EvilTokenizer(BertTokenizer):\n    pass\n")
    (path / "evil_config.py").write_text(code + "from transformers import BertConfig\n"
                                         "class EvilConfig(BertConfig):\n    pass\n")
    name = "config.json" if where == "config" else "tokenizer_config.json"
    data = json.loads((path / name).read_text()) if (path / name).exists() else {}
    data["auto_map"] = {"AutoConfig": "evil_config.EvilConfig",
                        "AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (path / name).write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("where", ["config", "tokenizer"])
@pytest.mark.parametrize("stdin", ["y\n", None])
def test_a_model_folder_asking_for_custom_code_is_refused_without_a_prompt(where, stdin, corpus, tmp_path):
    marker = tmp_path / "remote_code_ran"
    evil = remote_code_folder(corpus, tmp_path / "evil_bert", marker, where)
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    key = "model.text.bert" if where == "config" else "model.text.tokenizer"
    proc = run(retrieval_args(corpus, out, f"{key}={evil}"), cwd=tmp_path, stdin=stdin)
    assert_one_line(proc, 2, "custom code", "auto_map")
    assert not marker.exists()
    assert snapshot(tmp_path, skip=out) == before


@pytest.mark.parametrize("stdin", ["y\n", None])
def test_albef_load_refuses_a_stored_config_naming_a_remote_code_folder(stdin, weights, corpus, tmp_path):
    marker = tmp_path / "remote_code_ran"
    evil = remote_code_folder(corpus, tmp_path / "evil_bert", marker, "config")
    checkpoint = torch.load(weights, weights_only=True)
    checkpoint["config"]["model"]["text"]["bert"] = str(evil)
    torch.save(checkpoint, tmp_path / "best.pt")
    before = snapshot(tmp_path)
    proc = run(["-c", LOAD, str(tmp_path / "best.pt")], cwd=tmp_path, stdin=stdin)
    assert_one_line(proc, 2, "custom code")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 3. bounded sizes


@pytest.mark.parametrize("field,value", [("vocab_size", 10 ** 12), ("type_vocab_size", 100_000),
                                         ("num_hidden_layers", -4), ("hidden_size", 10 ** 9)])
def test_absurd_sizes_in_a_model_folder_config_are_one_line(field, value, corpus, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    for file in (corpus / "bert").iterdir():
        (bert / file.name).write_bytes(file.read_bytes())
    data = json.loads((bert / "config.json").read_text())
    data[field] = value
    (bert / "config.json").write_text(json.dumps(data))
    out = tmp_path / "run"
    # test_tiny.yaml / demo.yaml override hidden_size: an override is bounded as the folder's value
    extra = [f"model.text.config_overrides.{field}={value}"] if field in ("hidden_size", "num_hidden_layers") else []
    proc = run(retrieval_args(corpus, out, f"model.text.bert={bert}", *extra), cwd=tmp_path)
    assert_one_line(proc, 2, field, str(value))
    assert not out.exists()


def test_absurd_sizes_in_a_stored_config_are_one_line(weights, tmp_path):
    checkpoint = torch.load(weights, weights_only=True)
    checkpoint["config"]["model"]["vision"]["embed_dim"] = 10 ** 9
    torch.save(checkpoint, tmp_path / "best.pt")
    proc = run(["-c", LOAD, str(tmp_path / "best.pt")], cwd=tmp_path)
    assert_one_line(proc, 2, "model.vision.embed_dim", "16384")


def test_a_vocabulary_that_disagrees_with_the_config_is_one_line_before_training(corpus, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    for file in (corpus / "bert").iterdir():
        (bert / file.name).write_bytes(file.read_bytes())
    vocab = (bert / "vocab.txt").read_text().splitlines()
    (bert / "vocab.txt").write_text("\n".join(vocab[:-3]) + "\n")
    (bert / "tokenizer.json").unlink()  # the fast tokenizer's own copy of the vocabulary
    out = tmp_path / "run"
    proc = run(retrieval_args(corpus, out, f"model.text.bert={bert}"), cwd=tmp_path)
    assert_one_line(proc, 2, "vocab_size", "tokens")
    assert not out.exists()


# ----------------------------------------------------------------------------- 6. one exit code per kind


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("mode", [[], ["--evaluate"]])
def test_a_refused_init_from_file_exits_2_in_training_and_evaluation(mode, corpus, tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"model": _Touch(marker)}, tmp_path / "hostile.pth")
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    proc = run(retrieval_args(corpus, out, "--init-from", str(tmp_path / "hostile.pth"), *mode), cwd=tmp_path)
    assert_one_line(proc, 2, "hostile.pth", "refused")
    assert not marker.exists()
    assert snapshot(tmp_path, skip=out) == before
    # a path that does not exist: one line naming the option the user typed
    proc = run(retrieval_args(corpus, out, "--init-from", str(tmp_path / "nothing.pt"), *mode), cwd=tmp_path)
    assert_one_line(proc, 2, f"--init-from {tmp_path / 'nothing.pt'}")


# ----------------------------------------------------------------------------- 5. REFER converter


_REF = {"ref_id": 7, "ann_id": 100, "image_id": 55, "split": "testA"}
_ANN = {"id": 100, "bbox": [1, 2, 30, 40], "image_id": 55}


@pytest.mark.parametrize("refs,annotations,needle", [
    ([{**_REF, "ann_id": [100]}], [_ANN], "reference 0"),
    ([{**_REF, "ref_id": "seven"}], [_ANN], "reference 0"),
    ([{**_REF, "split": 3}], [_ANN], "reference 0"),
    ([_REF], [{**_ANN, "id": [100]}], "annotation 0"),
    ([_REF], [{**_ANN, "bbox": "1 2 30 40"}], "annotation 0"),
    ([_REF], [{**_ANN, "bbox": [1, 2, "a", 4]}], "annotation 0"),
    ([_REF], ["not an object"], "annotation 0"),
])
def test_refer_converter_checks_every_field_type_in_one_line(refs, annotations, needle, tmp_path):
    import pickle

    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp_path / "instances.json").write_text(json.dumps({"annotations": annotations}))
    before = snapshot(tmp_path)
    proc = run(["-m", "albef.data.grounding", "--refs", str(tmp_path / "refs(unc).p"), "--instances",
                str(tmp_path / "instances.json"), "--out", str(tmp_path / "refs.json")], cwd=tmp_path)
    assert_one_line(proc, 2, needle)
    assert snapshot(tmp_path) == before


def test_refer_converter_input_that_is_not_json_is_one_line(tmp_path):
    import pickle

    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([_REF], protocol=2))
    (tmp_path / "instances.json").write_bytes(b"\xff\xfe{not json")
    proc = run(["-m", "albef.data.grounding", "--refs", str(tmp_path / "refs(unc).p"), "--instances",
                str(tmp_path / "instances.json"), "--out", str(tmp_path / "refs.json")], cwd=tmp_path)
    assert_one_line(proc, 2, "instances.json")
    assert not (tmp_path / "refs.json").exists()


# ----------------------------------------------------------------------------- 4. YAML / JSON we read


def test_a_python_tag_in_a_run_config_is_our_one_line_refusal(weights, tmp_path):
    marker = tmp_path / "yaml_ran"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = torch.load(weights, weights_only=True)
    torch.save({"model": checkpoint["model"]}, run_dir / "checkpoints" / "step_00000004.pt")  # no stored config
    (run_dir / "config.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    before = snapshot(tmp_path)
    proc = run(["-c", LOAD, str(run_dir)], cwd=tmp_path)
    assert_one_line(proc, 2, "config.yaml", "YAML tag")
    assert not marker.exists() and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 7. data preflight


def _corrupt_copy(corpus: Path, tmp_path: Path, how: str) -> Path:
    """test.json pointing one image at a missing / undecodable / FIFO file in an image root of copies."""
    root = tmp_path / "images"
    root.mkdir()
    entries = json.loads((corpus / "test.json").read_text())
    for entry in entries:
        (root / Path(entry["image"]).name).write_bytes((corpus / entry["image"]).read_bytes())
        entry["image"] = Path(entry["image"]).name
    bad = root / entries[1]["image"]
    bad.unlink()
    if how == "undecodable":
        bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    elif how == "fifo":
        os.mkfifo(bad)
    (tmp_path / "test.json").write_text(json.dumps(entries))
    return root


@pytest.mark.parametrize("how", ["missing", "undecodable", "fifo"])
def test_a_bad_evaluation_image_is_one_line_before_training(how, corpus, tmp_path):
    root = _corrupt_copy(corpus, tmp_path, how)
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    proc = run(retrieval_args(corpus, out, f"eval.test_files=[{tmp_path / 'test.json'}]", f"eval.image_root={root}"),
               cwd=tmp_path, timeout=120)  # a FIFO that were opened would hang until the timeout
    assert_one_line(proc, 2, "eval.test_files", "1 of")
    assert not out.exists() and snapshot(tmp_path) == before


def test_an_empty_evaluation_file_is_one_line_naming_it(corpus, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    out = tmp_path / "run"
    proc = run(retrieval_args(corpus, out, f"eval.test_files=[{tmp_path / 'empty.json'}]"), cwd=tmp_path)
    assert_one_line(proc, 2, "empty.json", "no entries")
    assert not out.exists()


def test_a_fifo_training_image_is_skipped_and_counted_never_opened(tmp_path):
    from albef.data.datasets import SampleError, read_image

    os.mkfifo(tmp_path / "image.jpg")
    with pytest.raises(SampleError) as err:
        read_image(str(tmp_path / "image.jpg"))  # opening a FIFO for reading would block here
    assert err.value.reason == "unreadable" and "not a regular file" in err.value.detail


def test_grounding_boxes_and_detections_are_checked_before_training(tmp_path):
    from albef.config import load_config
    from albef.data.datasets import AnnotationError
    from albef.data.synthetic import generate_grounding_set
    from albef.tasks.grounding import GroundingTask

    gset = generate_grounding_set(str(tmp_path / "g"), num_train=4, num_val=2, num_test=2, image_size=32)
    cfg = load_config(str(TINY), [f"data.train_files=[{gset['train']}]", f"data.image_root={gset['image_root']}",
                                  f"eval.val_files=[{gset['val']}]", f"eval.image_root={gset['image_root']}",
                                  f"grounding.det_file={gset['dets']}", "loss.weights.mlm=0"])
    GroundingTask().check(cfg)
    refs = json.loads(Path(gset["val"]).read_text())
    refs[0]["bbox"] = [20, 20, 40, 40]  # beyond a 32 px image
    (tmp_path / "val.json").write_text(json.dumps(refs))
    cfg.eval.val_files = [str(tmp_path / "val.json")]
    with pytest.raises(AnnotationError, match=f"ref_id {refs[0]['ref_id']}"):
        GroundingTask().check(cfg)
    cfg.eval.val_files = [gset["val"]]
    dets = json.loads(Path(gset["dets"]).read_text())
    dets.pop(str(refs[0]["image_id"]))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    cfg.grounding.det_file = str(tmp_path / "dets.json")
    with pytest.raises(AnnotationError, match="no boxes for 1 evaluation image"):
        GroundingTask().check(cfg)


def test_text_assignment_skips_a_step_whose_batch_shrank_below_3_images():
    """The engine skips (and counts, as nonfinite_skip) a step whose loss is not finite; a text
    assignment batch left with fewer than 3 readable images gives such a loss instead of raising."""
    from albef.tasks.nlvr_pretrain import TextAssignmentTask

    model = torch.nn.Linear(3, 2)
    batch = {"images": torch.zeros(2, 3, 32, 32), "input_ids": torch.zeros(2, 4, dtype=torch.long),
             "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    out = TextAssignmentTask().forward_step(model, batch, alpha=0.0)
    assert not torch.isfinite(out["loss"]) and not torch.isfinite(out["loss_ta"])
    out["loss"].backward()  # every rank can still take part in the (skipped) backward
    assert model.weight.grad is not None
