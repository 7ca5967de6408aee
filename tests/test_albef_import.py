"""Loading released ALBEF checkpoints: a tiny real one end to end, full-size key manifests."""
import json
import os
from pathlib import Path

import pytest
import torch

from albef.checkpoint import (CheckpointError, load_checkpoint_file, load_pretrained,
                              map_albef_keys, match_state_dict, save_pretrained)
from albef.config import Config
from albef.build import build_model

torch.set_num_threads(2)

# ALBEF_ORIGINAL_DIR: where a worktree (not next to ../shared) finds the reference files
SHARED = Path(os.environ.get("ALBEF_ORIGINAL_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "albef_original")
TINY = SHARED / "tiny_albef_pretrain.pth"
pytestmark = pytest.mark.skipif(
    not TINY.is_file(), reason=f"reference ALBEF files not found in {SHARED} (the tiny ALBEF "
    "checkpoint and key manifests built from the original code)")

POSITION_IDS = ["text_encoder.bert.embeddings.position_ids",
                "text_encoder_m.bert.embeddings.position_ids"]
POS_EMBEDS = ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
BERT_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """ALBEF's tiny BERT config plus a bert-base-uncased-sized vocab (special ids as BERT's)."""
    path = tmp_path_factory.mktemp("bert_tiny")
    (path / "config.json").write_text((SHARED / "config_bert_tiny.json").read_text())
    vocab = [BERT_SPECIAL.get(i, f"tok{i}") for i in range(30522)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return path


def _config(bert_dir, image_size=64, queue_size=64, **vision):
    """Our config matching ALBEF's Pretrain_tiny.yaml + config_bert_tiny.json."""
    tiny_vit = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16, "mlp_ratio": 4.0}
    return Config.from_dict({"model": {
        "embed_dim": 32, "queue_size": queue_size,
        "vision": {"image_size": image_size, "pretrained": False, **tiny_vit, **vision},
        "text": {"bert": str(bert_dir), "pretrained": False, "fusion_layer": 2},
    }})


def _model(bert_dir, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(_config(bert_dir, **kwargs))


def test_tiny_albef_checkpoint_loads_exactly(bert_dir):
    model = _model(bert_dir)
    report = load_pretrained(model, TINY)
    assert report.unexpected == POSITION_IDS
    assert report.missing == ["idx_queue"]
    assert not (report.resampled or report.reinitialised or report.skipped)
    assert "initialised empty" in " ".join(report.notes)

    albef = load_checkpoint_file(TINY)["model"]
    ours = model.state_dict()
    assert set(report.loaded) == set(albef) - set(POSITION_IDS) == set(ours) - {"idx_queue"}
    for key in report.loaded:
        assert torch.equal(ours[key], albef[key]), key
    assert (model.idx_queue == -1).all()
    text = model.text_encoder
    assert text.cls.predictions.decoder.weight is text.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("name", ["ours.pt", "ours.safetensors"])
def test_round_trip_through_our_format_is_exact(bert_dir, tmp_path, name):
    cfg = _config(bert_dir)
    model = _model(bert_dir)
    load_pretrained(model, TINY)
    path = save_pretrained(model, tmp_path / name, config=cfg.to_dict())
    fresh = _model(bert_dir, seed=1)
    report = load_pretrained(fresh, path)
    assert not (report.unexpected or report.resampled or report.reinitialised or report.skipped)
    expected, got = model.state_dict(), fresh.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_other_image_size_resamples_pos_embed(bert_dir):
    model = _model(bert_dir, image_size=96)
    report = load_pretrained(model, TINY)
    assert report.resampled == POS_EMBEDS
    albef = load_checkpoint_file(TINY)["model"]
    for key in POS_EMBEDS:
        got = model.state_dict()[key]
        assert got.shape == (1, 1 + 6 * 6, 64)
        assert torch.equal(got[:, 0], albef[key][:, 0])  # class-token position untouched
        assert not torch.equal(got[:, 1:17], albef[key][:, 1:])


def test_other_queue_size_reinitialises_queues(bert_dir):
    model = _model(bert_dir, queue_size=128)
    fresh = model.image_queue.clone()
    report = load_pretrained(model, TINY)
    assert report.reinitialised == ["image_queue", "text_queue", "idx_queue", "queue_ptr"]
    assert torch.equal(model.image_queue, fresh)


def test_wrong_size_config_names_keys_and_shapes(bert_dir):
    model = _model(bert_dir, embed_dim=128, num_heads=4)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, TINY)
    message = str(err.value)
    assert "\n" not in message and "model.vision" in message
    assert "70 tensors differ in shape" in message and message.count(" vs model ") == 5 and "and 65 more" in message


# ----------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def full_size_state(tmp_path_factory):
    """Meta-tensor (shape-only) state dict of our model at ALBEF's size (ViT-B, BERT-base)."""
    path = tmp_path_factory.mktemp("bert_base")
    config = json.loads((SHARED / "config_bert_tiny.json").read_text())
    config.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, max_position_embeddings=512, fusion_layer=6,
                  encoder_width=768)
    (path / "config.json").write_text(json.dumps(config))
    vocab = [BERT_SPECIAL.get(i, f"tok{i}") for i in range(30522)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = Config.from_dict({"model": {"vision": {"pretrained": False}, "text": {"bert": str(path), "pretrained": False}}})
    with torch.device("meta"):
        return build_model(cfg).state_dict()


def _manifest(name):
    spec = json.loads((SHARED / name).read_text())
    return {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta")
            for k, v in spec.items()}


def test_pretrain_manifest_maps_onto_our_keys(full_size_state):
    state = _manifest("albef_pretrain_keys.json")
    final, report = match_state_dict(map_albef_keys(state), full_size_state)
    assert report.unexpected == POSITION_IDS
    assert report.missing == ["idx_queue"]
    assert not (report.resampled or report.reinitialised or report.skipped)
    assert final.keys() == full_size_state.keys()
    assert len(report.loaded) == len(state) - 2


def test_retrieval_manifest_maps_onto_our_keys(full_size_state):
    # Retrieval checkpoints keep a BertModel text encoder (no MLM head) at 384 px.
    state = _manifest("albef_retrieval_keys.json")
    assert "text_encoder.embeddings.word_embeddings.weight" in state
    skip = ["text_encoder.cls", "text_encoder_m.cls"]
    final, report = match_state_dict(map_albef_keys(state), full_size_state, skip=skip)
    assert report.unexpected == POSITION_IDS
    assert report.resampled == POS_EMBEDS
    assert not (report.missing or report.reinitialised)
    assert report.skipped and all(k.startswith(("text_encoder.cls.", "text_encoder_m.cls."))
                                  for k in report.skipped)
    assert final.keys() == full_size_state.keys()
    for key in POS_EMBEDS:
        assert final[key].shape == full_size_state[key].shape == (1, 257, 768)
