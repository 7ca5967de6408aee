"""Checkpoint I/O: safe loading, atomic saving, pruning, resume lookup, pretrained loading."""
import errno
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from albef import checkpoint as ck
from albef.checkpoint import (CheckpointError, find_latest, load_checkpoint_file,
                              load_pretrained, resolve_resume, save_checkpoint, save_pretrained)

torch.set_num_threads(1)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _dir_names(path):
    return sorted(p.name for p in path.iterdir())


# ----------------------------------------------------------------------------- safe loading


class _OpenFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


class _System:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("payload", [_OpenFile, _System])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickled_code_is_refused_and_never_run(tmp_path, payload, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.zeros(2)}, "extra": payload(marker)}
    with open(path, "wb") as f:
        torch.save(obj, f) if writer == "torch" else pickle.dump(obj, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    msg = _one_line(err)
    assert str(path) in msg and "not plain tensors" in msg and "not be executed" in msg
    with pytest.raises(CheckpointError):
        load_pretrained(nn.Linear(2, 2), path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file_gives_one_line_error_naming_it(tmp_path, damage, suffix):
    good = tmp_path / f"good{suffix}"
    state = {"w": torch.randn(64, 64)}
    save_file(state, good) if suffix == ".safetensors" else torch.save(state, good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint",
                     "empty": b""}[damage])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(bad)
    assert str(bad) in _one_line(err) and "corrupt" in str(err.value)
    assert torch.equal(load_checkpoint_file(good)["w"], state["w"])


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint_file(tmp_path / "nope.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint_file(tmp_path / "tensor.pt")


# ----------------------------------------------------------------------------- atomic saving


def _state(step):
    return {"step": step, "model": {"w": torch.full((4,), float(step))}, "rng": [1, 2, 3]}


def _saved_steps(ckpt_dir):
    return [n for n in _dir_names(ckpt_dir) if n.startswith("step_")]


def test_save_writes_pointer_last_and_prunes(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in range(1, 6):
        path = save_checkpoint(_state(step), ckpt_dir, step, keep_last=2)
        assert path == ckpt_dir / f"step_{step:08d}.pt"
        assert (ckpt_dir / "latest").read_text().strip() == path.name
    assert _dir_names(ckpt_dir) == ["latest", "step_00000004.pt", "step_00000005.pt"]
    latest = find_latest(ckpt_dir)
    assert latest == ckpt_dir / "step_00000005.pt"
    assert load_checkpoint_file(latest)["model"]["w"].tolist() == [5.0] * 4


def test_keep_last_one_keeps_the_only_good_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    save_checkpoint(_state(2), tmp_path, 2, keep_last=1)
    assert _saved_steps(tmp_path) == ["step_00000002.pt"]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError):
        save_checkpoint(_state(3), tmp_path, 3, keep_last=1)
    monkeypatch.undo()
    assert _dir_names(tmp_path) == ["latest", "step_00000002.pt"]
    assert load_checkpoint_file(find_latest(tmp_path))["step"] == 2
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(_state(4), tmp_path, 4, keep_last=0)


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path):
    # A run resumed from an older step writes step 3 while a stale step 5 is still on disk.
    save_checkpoint(_state(5), tmp_path, 5, keep_last=1)
    save_checkpoint(_state(3), tmp_path, 3, keep_last=1)
    assert _saved_steps(tmp_path) == ["step_00000003.pt", "step_00000005.pt"]
    assert find_latest(tmp_path) == tmp_path / "step_00000003.pt"


def test_disk_full_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=3)
    real_save = torch.save

    def partial_then_enospc(obj, f, *args, **kwargs):
        real_save(obj, f)  # bytes reach the temp file, then the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", partial_then_enospc)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(_state(2), tmp_path, 2, keep_last=3)
    msg = _one_line(err)
    assert str(tmp_path / "step_00000002.pt") in msg and "No space left on device" in msg
    assert _dir_names(tmp_path) == ["latest", "step_00000001.pt"]  # no temp file left
    assert load_checkpoint_file(find_latest(tmp_path))["step"] == 1


def test_failed_pointer_rename_keeps_previous_pointer(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=3)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "latest":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(_state(2), tmp_path, 2, keep_last=3)
    assert str(tmp_path / "latest") in _one_line(err)
    monkeypatch.undo()
    assert _dir_names(tmp_path) == ["latest", "step_00000001.pt", "step_00000002.pt"]
    assert find_latest(tmp_path) == tmp_path / "step_00000001.pt"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores directory permissions; covered by the ENOSPC tests")
def test_read_only_directory(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=3)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(_state(2), tmp_path, 2, keep_last=3)
    finally:
        tmp_path.chmod(0o755)
    assert "step_00000002.pt" in _one_line(err)
    assert load_checkpoint_file(find_latest(tmp_path))["step"] == 1


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_find_latest_ignores_temp_files_and_skips_corrupt_newest(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=5)
    save_checkpoint(_state(2), tmp_path, 2, keep_last=5)
    host = socket.gethostname()
    half_written = tmp_path / f".step_00000009.pt.{host}.{_dead_pid()}.tmp"
    other_host = tmp_path / ".step_00000009.pt.elsewhere.1.tmp"
    foreign = tmp_path / "step_00000009.pt.tmp"
    for tmp in (half_written, other_host, foreign):
        tmp.write_bytes(b"half")
    assert find_latest(tmp_path) == tmp_path / "step_00000002.pt"

    good = (tmp_path / "step_00000002.pt").read_bytes()
    (tmp_path / "step_00000002.pt").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="step_00000002.pt"):
        assert find_latest(tmp_path) == tmp_path / "step_00000001.pt"

    save_checkpoint(_state(3), tmp_path, 3, keep_last=5)  # removes our stale temp only
    assert not half_written.exists() and other_host.exists() and foreign.exists()


def test_find_latest_skips_a_checkpoint_with_flipped_bytes(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=5)
    path = save_checkpoint({"w": torch.randn(10_000)}, tmp_path, 2, keep_last=5)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor payload: the zip still opens, CRC fails
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_00000002.pt"):
        assert find_latest(tmp_path) == tmp_path / "step_00000001.pt"


def test_find_latest_empty_and_missing(tmp_path):
    assert find_latest(tmp_path / "absent") is None
    assert find_latest(tmp_path) is None


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(None, run) is None
    assert resolve_resume("auto", run) is None
    path = save_checkpoint(_state(7), ck.checkpoint_dir(run), 7, keep_last=1)
    assert resolve_resume("auto", run) == path
    assert resolve_resume(str(path), tmp_path / "other") == path
    assert resolve_resume(str(run), tmp_path / "other") == path
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(str(tmp_path / "missing.pt"), run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no intact"):
        resolve_resume(str(tmp_path / "empty"), run)


# ----------------------------------------------------------------------------- pretrained


class _Toy(nn.Module):
    """The parts of the ALBEF state dict that need special handling, at toy size."""

    def __init__(self, image_size=32, width=32, embed_dim=8, queue_size=16, vocab=50):
        super().__init__()
        self.visual_encoder = VisionTransformer(
            img_size=image_size, patch_size=16, embed_dim=width, depth=1, num_heads=2,
            num_classes=0)
        self.text_encoder = nn.Module()
        self.text_encoder.bert = nn.Module()
        self.text_encoder.bert.embeddings = nn.Module()
        words = nn.Embedding(vocab, width)
        self.text_encoder.bert.embeddings.word_embeddings = words
        self.text_encoder.cls = nn.Module()
        head = nn.Module()
        self.text_encoder.cls.predictions = head
        head.bias = nn.Parameter(torch.randn(vocab))
        head.decoder = nn.Linear(width, vocab)
        head.decoder.weight, head.decoder.bias = words.weight, head.bias  # tied as in HF BERT
        self.vision_proj = nn.Linear(width, embed_dim)
        self.register_buffer("image_queue", torch.randn(embed_dim, queue_size))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def _albef_retrieval_state(model):
    """A state dict laid out like ALBEF's retrieval checkpoints (BertModel text encoder)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("text_encoder.cls."):
            continue
        out[key.replace("text_encoder.bert.", "text_encoder.")] = value.clone()
    out["text_encoder.embeddings.position_ids"] = torch.arange(8)[None]
    return out


def _assert_same_state(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key not in skip:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", ["export.pt", "export.safetensors"])
def test_save_pretrained_round_trip(tmp_path, name):
    torch.manual_seed(0)
    src, dst = _Toy(), _Toy()
    path = save_pretrained(src, tmp_path / name, config={"model": {"embed_dim": 8}})
    report = load_pretrained(dst, path)
    _assert_same_state(src, dst)
    words = dst.text_encoder.bert.embeddings.word_embeddings.weight
    assert dst.text_encoder.cls.predictions.decoder.weight is words  # still tied
    if name.endswith(".pt"):
        assert load_checkpoint_file(path)["config"] == {"model": {"embed_dim": 8}}
        assert report.missing == []
    else:  # the tied aliases are dropped on export and restored from their twins
        assert report.missing == ["text_encoder.cls.predictions.decoder.bias",
                                  "text_encoder.cls.predictions.decoder.weight"]
    assert not report.unexpected and not report.resampled and not report.reinitialised


def test_albef_layout_is_mapped_and_every_key_accounted_for(tmp_path):
    torch.manual_seed(0)
    src, dst = _Toy(), _Toy()
    path = tmp_path / "albef_retrieval.pth"
    torch.save({"model": _albef_retrieval_state(src), "config": {"queue_size": 16}}, path)
    missing = (r"missing keys 2 \(text_encoder.cls.predictions.bias, "
               r"text_encoder.cls.predictions.decoder.bias\);")
    with pytest.raises(CheckpointError, match=missing):
        load_pretrained(dst, path)
    report = load_pretrained(dst, path, skip=["text_encoder.cls"])
    _assert_same_state(src, dst, skip=report.skipped)
    assert report.skipped == ["text_encoder.cls.predictions.bias",
                              "text_encoder.cls.predictions.decoder.bias",
                              "text_encoder.cls.predictions.decoder.weight"]
    assert report.unexpected == ["text_encoder.bert.embeddings.position_ids"]
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in report.loaded


def test_plain_state_dict_with_untied_head_is_refused(tmp_path):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in _Toy().state_dict().items()}
    state["text_encoder.cls.predictions.decoder.weight"] += 1
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="tied in the model"):
        load_pretrained(_Toy(), tmp_path / "plain.pt")


def test_pos_embed_is_resampled_to_the_model_grid(tmp_path):
    torch.manual_seed(0)
    src, dst = _Toy(image_size=32), _Toy(image_size=64)
    save_pretrained(src, tmp_path / "small.pt")
    report = load_pretrained(dst, tmp_path / "small.pt")
    assert report.resampled == ["visual_encoder.pos_embed"]
    assert "2x2 to a 4x4" in " ".join(report.notes)
    old, new = src.visual_encoder.pos_embed, dst.visual_encoder.pos_embed
    assert new.shape == (1, 17, 32)
    assert torch.equal(new[:, :1], old[:, :1])  # class token position kept as is
    assert torch.allclose(new[:, 1:].mean(), old[:, 1:].mean(), atol=0.05)


def test_pos_embed_downsampling_matches_albef_interpolation(tmp_path):
    torch.manual_seed(0)
    src, dst = _Toy(image_size=64), _Toy(image_size=32)
    save_pretrained(src, tmp_path / "big.pt")
    load_pretrained(dst, tmp_path / "big.pt")
    grid = src.visual_encoder.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    got = dst.visual_encoder.pos_embed[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    assert torch.allclose(got, expected, atol=1e-6)


def test_tied_aliases_the_model_lacks_are_ignored_only_when_equal(tmp_path):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in _Toy().state_dict().items()}
    torch.save(state, tmp_path / "tied.pt")
    state["text_encoder.cls.predictions.decoder.weight"] += 1
    torch.save(state, tmp_path / "untied.pt")
    model = _Toy()
    del model.text_encoder.cls.predictions.decoder  # a model without the aliased head
    report = load_pretrained(model, tmp_path / "tied.pt")
    assert report.unexpected == ["text_encoder.cls.predictions.decoder.bias",
                                 "text_encoder.cls.predictions.decoder.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected keys 1 \(text_encoder.cls.predictions"
                                              r".decoder.weight\)"):
        load_pretrained(model, tmp_path / "untied.pt")


def test_queues_of_another_size_are_reinitialised(tmp_path):
    torch.manual_seed(0)
    src, dst = _Toy(queue_size=16), _Toy(queue_size=32)
    fresh = dst.image_queue.clone()
    save_pretrained(src, tmp_path / "q16.pt")
    report = load_pretrained(dst, tmp_path / "q16.pt")
    assert report.reinitialised == ["image_queue", "idx_queue", "queue_ptr"]
    assert "queue size differs (checkpoint 16, model 32): queues re-initialised" in report.notes
    assert torch.equal(dst.image_queue, fresh)
    assert torch.equal(dst.vision_proj.weight, src.vision_proj.weight)


def test_missing_idx_queue_is_initialised_empty(tmp_path):
    torch.manual_seed(0)
    src, dst = _Toy(), _Toy()
    state = {k: v for k, v in src.state_dict().items() if k != "idx_queue"}
    torch.save({"model": state}, tmp_path / "pretrain.pth")
    report = load_pretrained(dst, tmp_path / "pretrain.pth")
    assert report.missing == ["idx_queue"]
    assert torch.equal(dst.image_queue, src.image_queue)
    assert (dst.idx_queue == -1).all()


def test_wrong_shapes_name_keys_and_shapes(tmp_path):
    save_pretrained(_Toy(embed_dim=8), tmp_path / "e8.pt")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(_Toy(embed_dim=16), tmp_path / "e8.pt")
    message = str(err.value)
    assert "\n" not in message  # one line
    assert str(tmp_path / "e8.pt") in message and "model.embed_dim" in message and "3 tensors differ" in message
    for part in ("image_queue: checkpoint [8, 16] vs model [16, 16]", "vision_proj.bias: checkpoint [8] vs model [16]",
                 "vision_proj.weight: checkpoint [8, 32] vs model [16, 32]"):
        assert part in message
    assert "Traceback" not in str(err.value) and "load_state_dict" not in str(err.value)


def test_unknown_keys_are_listed_with_a_count(tmp_path):
    state = dict(_Toy().state_dict())
    for i in range(12):
        state[f"extra.layer{i:02d}"] = torch.zeros(1)
    del state["vision_proj.bias"]
    torch.save({"model": state}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(_Toy(), tmp_path / "odd.pt")
    msg = _one_line(err)
    assert "missing keys 1 (vision_proj.bias)" in msg
    assert "unexpected keys 12 (extra.layer00," in msg and "extra.layer09, ...)" in msg
    assert "extra.layer10" not in msg
    report = load_pretrained(_Toy(), tmp_path / "odd.pt", skip=["extra.*", "vision_proj.bias"])
    assert len(report.skipped) == 13


def test_non_tensor_state_is_refused(tmp_path):
    torch.save({"model": {"w": [1, 2]}}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="'w' holds a list"):
        load_pretrained(_Toy(), tmp_path / "list.pt")
