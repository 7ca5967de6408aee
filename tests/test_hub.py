"""Sharing checkpoints (albef/hub.py): `albef export` folders, `hf-hub:` names, `albef push`.

One real tiny pretraining run (with a val evaluation, so results/ holds metrics) is exported;
the folder must load as the run does, start fine-tuning with the same load report, resolve
from an offline Hub cache, refuse anything that is not plain data, and describe the run.
"""
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import albef
from albef import hub
from albef.checkpoint import CheckpointError, load_checkpoint_file, map_albef_keys, read_model_state
from albef.command import main as albef_main

from conftest import ORIGINAL, TINY_YAML, needs_original, tiny_corpus, write_original_bert

pytestmark = pytest.mark.slow  # real tiny runs, exports and command-line starts

torch.set_num_threads(2)
QUEUES = {"image_queue", "text_queue", "idx_queue", "queue_ptr"}
TINY_ALBEF = ORIGINAL / "tiny_albef_pretrain.pth"


class _Touch:
    """Unpickling this creates `marker` (what a hostile file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real tiny pretraining run (2 steps, val evaluated) and its two exports."""
    root = tmp_path_factory.mktemp("hub")
    corpus = tiny_corpus(root / "corpus", num_train=8)
    run_dir = root / "run"
    assert albef_main([
        "pretrain", "--config", str(TINY_YAML), f"output_dir={run_dir}", f"data.train_files=[{corpus['train']}]",
        f"data.image_root={corpus['image_root']}", f"model.text.bert={corpus['bert']}",
        f"eval.val_files=[{corpus['test']}]", f"eval.image_root={corpus['image_root']}"]) == 0
    assert albef_main(["export", str(run_dir), str(root / "exported"), "--license", "mit"]) == 0
    assert albef_main(["export", str(run_dir), str(root / "full"), "--with-momentum"]) == 0
    test = json.loads(Path(corpus["test"]).read_text())
    images = [Image.open(Path(corpus["image_root"]) / e["image"]) for e in test]
    captions = [c for e in test for c in e["caption"]]
    return {"root": root, "corpus": corpus, "run": run_dir, "exported": root / "exported", "full": root / "full",
            "images": images, "captions": captions}


def _run_state(run):
    return map_albef_keys(load_checkpoint_file(next((run["run"] / "checkpoints").glob("step_*.pt")))["model"])


def test_export_writes_only_plain_files(run):
    for folder in (run["exported"], run["full"]):
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert files <= hub.EXPECTED_FILES and {"model.safetensors", "config.yaml", "README.md",
                                                "bert/config.json", "bert/tokenizer_config.json"} <= files
    config = yaml.safe_load((run["exported"] / "config.yaml").read_text())
    assert config["model"]["text"]["bert"] == "bert" and config["model"]["init_checkpoint"] is None


def test_export_loads_with_every_tensor_equal_and_the_run_scores(run):
    from safetensors.torch import load_file

    expected = _run_state(run)
    reference, _ = albef.load(run["run"])
    sims = reference.similarity(run["images"], run["captions"])
    itm = reference.itm_score(run["images"], run["captions"])

    # --with-momentum: the loaded model is the run's model, tensor for tensor
    full, _ = albef.load(run["full"])
    got = full.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    # default: the online weights; the file holds no momentum copies or queues
    stored = load_file(run["exported"] / "model.safetensors")
    assert not any(k.split(".")[0].endswith("_m") or k in QUEUES for k in stored)
    online, _ = albef.load(run["exported"])
    got = online.model.state_dict()
    for key, value in expected.items():
        top = key.split(".")[0]
        if key in QUEUES:
            continue
        source = key.replace(f"{top}.", f"{top[:-2]}.", 1) if top.endswith("_m") else key
        assert torch.equal(got[key], expected[source]), key  # momentum copies start as the online weights
    for key, value in stored.items():
        assert torch.equal(value, expected[key]), key

    for model in (full, online):
        assert torch.equal(model.similarity(run["images"], run["captions"]), sims)
        assert torch.equal(model.itm_score(run["images"], run["captions"]), itm)


def _finetune_report(run, init_from, capfd, out):
    """Start a 1-step retrieval fine-tuning run from `init_from`; its load report lines."""
    corpus = run["corpus"]
    code = albef_main([
        "retrieval", "--config", str(TINY_YAML), "--init-from", str(init_from), f"output_dir={out}",
        f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
        f"model.text.bert={corpus['bert']}", "loss.weights.mlm=0", "train.max_steps=1"])
    err = capfd.readouterr().err
    assert code == 0, err
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("loaded "))
    report = [lines[start].replace(str(init_from), "SOURCE")]
    report += [line for line in lines[start + 1:] if line.startswith("  ")][:8]
    return report


def test_init_from_an_export_gives_the_checkpoint_load_report(run, capfd, tmp_path):
    checkpoint = next((run["run"] / "checkpoints").glob("step_*.pt"))
    from_checkpoint = _finetune_report(run, checkpoint, capfd, tmp_path / "a")
    from_export = _finetune_report(run, run["full"], capfd, tmp_path / "b")
    assert from_export == from_checkpoint
    assert "text_encoder.cls.predictions.* (7)" in "\n".join(from_export)  # the report is a real one
    # online-only export: the same, except that the queues start fresh (reported as new)
    online = _finetune_report(run, run["exported"], capfd, tmp_path / "c")
    assert online[0] == from_checkpoint[0].replace(
        from_checkpoint[0].split(": ")[1], online[0].split(": ")[1])
    assert "freshly initialised (new): idx_queue, image_queue, queue_ptr, text_queue" in "\n".join(online)


def _hub_cache(tmp_path: Path, folder: Path, repo="org/tiny", sha="0123456789abcdef0123456789abcdef01234567"):
    """A Hub cache as snapshot_download leaves it: blobs, a snapshot of links to them, refs/main."""
    repo_dir = tmp_path / "cache" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    for i, file in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        blob = repo_dir / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    return tmp_path / "cache", snapshot


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hf_hub_name_resolves_from_the_offline_cache(run, tmp_path, monkeypatch, no_network, capsys):
    cache, snapshot = _hub_cache(tmp_path, run["full"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = albef.load(run["full"])[0].similarity(run["images"], run["captions"])
    for name in ("hf-hub:org/tiny", f"hf-hub:org/tiny@{snapshot.name}"):
        model, _ = albef.load(name)
        assert torch.equal(model.similarity(run["images"], run["captions"]), reference), name
    state, expected = read_model_state("hf-hub:org/tiny"), _run_state(run)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    with pytest.raises(CheckpointError) as err:
        albef.load("hf-hub:org/absent")
    assert "\n" not in str(err.value) and "HF_HUB_OFFLINE is set" in str(err.value)
    with pytest.raises(CheckpointError, match="not a Hub model name"):
        read_model_state("hf-hub:no-slash")
    # --init-from takes Hub names too (no "file not found" from the path checks): here one not cached
    assert albef_main(["retrieval", "--config", str(TINY_YAML), "--init-from", "hf-hub:org/absent",
                       f"model.text.bert={run['corpus']['bert']}", f"data.train_files=[{run['corpus']['train']}]",
                       f"data.image_root={run['corpus']['image_root']}", "loss.weights.mlm=0",
                       f"output_dir={tmp_path / 'out'}"]) == 2
    assert "hf-hub:org/absent: not in the Hub cache" in _one_line_error(capsys)


def _hostile_copy(run, tmp_path, extra: str, marker: Path) -> Path:
    folder = tmp_path / "exported"
    shutil.copytree(run["exported"], folder)
    target = folder / extra
    if extra.endswith(".py"):
        target.write_text(f"import os\nos.system('touch {marker}')\n")
    elif extra.endswith(".bin"):
        torch.save({"model": _Touch(marker)}, target)
    else:
        target.write_bytes(pickle.dumps(_Touch(marker)))
    return folder


@pytest.fixture
def pickle_spy(monkeypatch, tmp_path):
    """Any torch.load / pickle.load during the test leaves `spy` behind."""
    spy = tmp_path / "a pickle reader ran"

    def tripwire(real):
        def wrapped(*args, **kwargs):
            spy.touch()
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(torch, "load", tripwire(torch.load))
    monkeypatch.setattr(pickle, "load", tripwire(pickle.load))
    return spy


@pytest.mark.parametrize("extra", ["pytorch_model.bin", "weights.pkl", "modeling_albef.py", "bert/tokenizer.pkl"])
def test_a_folder_with_an_unexpected_file_is_refused_in_one_line(run, tmp_path, monkeypatch, no_network, capsys,
                                                                  pickle_spy, extra):
    marker = tmp_path / "pwned"
    folder = _hostile_copy(run, tmp_path, extra, marker)
    for load in (albef.load, read_model_state):
        with pytest.raises(CheckpointError) as err:
            load(folder)
        message = str(err.value)
        assert "\n" not in message and "refused" in message and extra in message
    # the same folder in the Hub cache, by name
    cache, _ = _hub_cache(tmp_path, folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=f"refused.*{extra}"):
        albef.load("hf-hub:org/tiny")
    # and from the command line: exit 2, one line, before training
    assert albef_main(["export", str(folder), str(tmp_path / "again")]) == 2
    assert "already an exported folder" in _one_line_error(capsys)
    assert not marker.exists() and not pickle_spy.exists()


def _rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])


def _tensors(header):
    """Names of the non-empty tensors, in file order."""
    return sorted((k for k in header if k != "__metadata__" and header[k]["shape"] and all(header[k]["shape"])),
                  key=lambda k: header[k]["data_offsets"][0])


def _shape(header):
    header[_tensors(header)[1]]["shape"][0] *= 2


def _dtype(header):
    header[_tensors(header)[0]]["dtype"] = "F33"


def _overlap(header):
    key = _tensors(header)[1]
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [0, end - begin]


def _truncated_data(header):
    last = _tensors(header)[-1]
    header[last]["data_offsets"][1] += 4
    header[last]["shape"] = [(header[last]["data_offsets"][1] - header[last]["data_offsets"][0]) // 4]


@pytest.mark.parametrize("lie,expected", [
    (_shape, "needs"), (_dtype, "unknown dtype 'F33'"), (_overlap, "overlapping"), (_truncated_data, "data section"),
    ("pickle", "header length"),
])
def test_a_lying_safetensors_header_is_refused_in_one_line(run, tmp_path, capsys, pickle_spy, lie, expected):
    marker = tmp_path / "pwned"
    folder = tmp_path / "exported"
    shutil.copytree(run["exported"], folder)
    weights = folder / "model.safetensors"
    if lie == "pickle":  # a pickle named model.safetensors
        torch.save({"model": _Touch(marker)}, weights)
    else:
        _rewrite_header(weights, lie)
    with pytest.raises(CheckpointError) as err:
        albef.load(folder)
    message = str(err.value)
    assert "\n" not in message and "safetensors header" in message and expected in message
    assert albef_main(["retrieval", "--config", str(TINY_YAML), "--init-from", str(folder),
                       f"model.text.bert={run['corpus']['bert']}", f"data.train_files=[{run['corpus']['train']}]",
                       f"data.image_root={run['corpus']['image_root']}", "loss.weights.mlm=0",
                       f"output_dir={tmp_path / 'out'}"]) == 2
    assert expected in _one_line_error(capsys)
    assert not marker.exists() and not pickle_spy.exists()


def test_a_broken_yaml_config_is_one_line(run, tmp_path):
    folder = tmp_path / "exported"
    shutil.copytree(run["exported"], folder)
    (folder / "config.yaml").write_text("model: {text: [unclosed\n")
    with pytest.raises(CheckpointError) as err:
        albef.load(folder)
    assert "\n" not in str(err.value) and "config.yaml: not a readable YAML config at line" in str(err.value)


def test_model_card_names_the_run_results(run):
    text = (run["exported"] / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "albef" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "zero-shot-image-classification" and "albef" in meta["tags"]
    assert yaml.safe_load((run["full"] / "README.md").read_text().split("---\n")[1])["license"] == "other"
    results = {p.name: json.loads(p.read_text()) for p in (run["run"] / "results").glob("*_step*.json")}
    assert results, "the run evaluated nothing"
    for name, data in results.items():
        step = name.split("_step")[1].removesuffix(".json")
        assert f"| final, best (r_mean) | val | {step} |" in body  # one evaluation: the final one is the best
        for key, value in data.items():
            if isinstance(value, float) and not key.startswith("time_"):
                assert f"{key} {value:.4g}" in body, key
    assert f"`{run['corpus']['train']}`: 8 samples" in body and "- Steps: 2" in body
    assert f"albef {albef.__version__}, commit " in body and "commit unknown" not in body
    assert "- Task: `pretrain`" in body and 'albef.load("hf-hub:ORG/exported")' in body


def _clear_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.mark.parametrize("situation,expected", [
    ("offline", "HF_HUB_OFFLINE is set"), ("no token", "no Hugging Face token"),
    ("no network", "does not answer"),
])
def test_push_fails_in_one_line_before_any_work(run, tmp_path, monkeypatch, capsys, situation, expected):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if situation == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    elif situation == "no token":
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        _clear_token(monkeypatch, tmp_path)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once

    def no_work(*args, **kwargs):
        raise AssertionError("work was done before the push could fail")

    monkeypatch.setattr(hub, "export", no_work)
    monkeypatch.setattr(hub, "push", no_work)
    assert albef_main(["push", str(run["run"]), "org/tiny"]) == 2
    assert expected in _one_line_error(capsys)
    assert albef_main(["push", str(run["exported"]), "org/tiny", "--public"]) == 2
    assert expected in _one_line_error(capsys)
    out = tmp_path / "out"
    assert albef_main(["export", str(run["run"]), str(out), "--push", "org/tiny"]) == 2
    assert expected in _one_line_error(capsys) and not out.exists()


def test_export_refuses_an_existing_folder_and_weights_without_config(run, tmp_path, capsys):
    assert albef_main(["export", str(run["run"]), str(run["exported"])]) == 2
    assert "already exists" in _one_line_error(capsys)
    plain = tmp_path / "weights.pth"
    torch.save({"model": _run_state(run)}, plain)
    assert albef_main(["export", str(plain), str(tmp_path / "out")]) == 2
    assert "pass --config" in _one_line_error(capsys) and not (tmp_path / "out").exists()


@needs_original(TINY_ALBEF, ORIGINAL / "config_bert_tiny.json")
def test_released_albef_checkpoint_converts_once(tmp_path):
    """`albef export ALBEF.pth OUT --config CFG` on a checkpoint the original ALBEF code wrote."""
    bert = write_original_bert(tmp_path / "bert", ORIGINAL / "config_bert_tiny.json")
    cfg = tmp_path / "tiny_albef.yaml"  # our config matching ALBEF's Pretrain_tiny.yaml + config_bert_tiny.json
    cfg.write_text(yaml.safe_dump({"model": {
        "embed_dim": 32, "queue_size": 64,
        "vision": {"image_size": 64, "pretrained": False, "embed_dim": 64, "depth": 2, "num_heads": 4,
                   "patch_size": 16, "mlp_ratio": 4.0},
        "text": {"bert": str(bert), "pretrained": False, "fusion_layer": 2}}}))
    assert albef_main(["export", str(TINY_ALBEF), str(tmp_path / "full"), "--config", str(cfg),
                       "--with-momentum"]) == 0
    assert albef_main(["export", str(TINY_ALBEF), str(tmp_path / "online"), "--config", str(cfg)]) == 0
    original = map_albef_keys(load_checkpoint_file(TINY_ALBEF)["model"])
    for folder in (tmp_path / "full", tmp_path / "online"):
        assert not any(p.suffix in (".pth", ".pt", ".bin", ".pkl") for p in folder.rglob("*"))
        state = read_model_state(folder)
        for key, value in original.items():
            momentum = key.split(".")[0].endswith("_m") or key in QUEUES
            if key in state and (folder.name == "full" or not momentum):  # online: momentum copies = online
                assert torch.equal(state[key], value), key
        assert not (set(original) - set(state)) - QUEUES - {
            "text_encoder.bert.embeddings.position_ids", "text_encoder_m.bert.embeddings.position_ids"}
    full = read_model_state(tmp_path / "full")
    assert (full["idx_queue"] == -1).all()  # not in ALBEF's pretraining checkpoint: starts empty
    assert all(torch.equal(full[k], original[k]) for k in QUEUES - {"idx_queue"})
    body = (tmp_path / "online" / "README.md").read_text()
    assert "converted from `tiny_albef_pretrain.pth`" in body and "- Steps: not recorded" in body
    model, preprocess = albef.load(tmp_path / "online")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    assert model.similarity([image], ["a red square", "a blue circle"]).shape == (1, 2)


def test_model_card_results_rows_final_and_best_on_val():
    results = {"val_step2.json": {"r_mean": 3.0, "txt_r1": 1.5}, "val_step4.json": {"r_mean": 2.0},
               "val_latest.json": {"r_mean": 2.0}, "test_step4.json": {"r_mean": 1.0, "time_encode_s": 9.0}}
    assert hub._metric_rows(results, "r_mean") == [
        "| final | test | 4 | r_mean 1 |", "| final | val | 4 | r_mean 2 |",
        "| best (r_mean) | val | 2 | r_mean 3, txt_r1 1.5 |"]
