"""Shared test helpers: tiny BERT directories, tiny ALBEF configs/models/batches, tiny corpora.

Test files import these by name (`from conftest import make_model`) instead of from each other.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertConfig

from albef.config import Config, load_config
from albef.data.synthetic import generate_corpus
from albef.build import build_model
from albef.models.albef import ALBEF, TokenIds

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(43)]
TOKENS = TokenIds(pad=0, cls=2, sep=3, mask=4)  # ids of the special tokens in VOCAB
CAPTION_LENGTHS = (9, 6, 4, 7, 9, 5)  # make_batch cycles through these (cls + words + sep)


def write_tiny_bert(path: Path, hf_class=None, **config) -> Path:
    """A tiny HF BERT dir: config.json + WordPiece vocab.txt (+ weights of `hf_class`)."""
    path.mkdir(parents=True, exist_ok=True)
    settings = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=32)
    bert_config = BertConfig(**{**settings, **config})
    bert_config.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if hf_class is not None:
        torch.manual_seed(0)
        hf_class(bert_config).save_pretrained(path)
    return path


def tiny_config(tmp_path: Path, weights: dict | None = None, **loss) -> Config:
    """A 32 px / 24-wide ViT + 4-layer 32-wide BERT (fusion from layer 2) config, queue of 8.

    The BERT dir is `tmp_path / "bert"`, written with defaults unless it already exists.
    """
    cfg = Config()
    vision = cfg.model.vision
    vision.image_size, vision.patch_size, vision.embed_dim, vision.depth, vision.num_heads, vision.mlp_ratio = (
        32, 8, 24, 1, 2, 2.0)
    vision.pretrained = False  # random init: tests never download
    text = cfg.model.text
    bert_dir = tmp_path / "bert"
    text.bert = str(bert_dir if bert_dir.exists() else write_tiny_bert(bert_dir))
    text.pretrained, text.fusion_layer = False, 2
    cfg.model.embed_dim, cfg.model.queue_size = 16, 8
    for key, value in (weights or {}).items():
        setattr(cfg.loss.weights, key, value)
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg


def make_model(tmp_path: Path, weights: dict | None = None, **loss) -> ALBEF:
    """`tiny_config`'s model; seeded, so every call (and every rank) builds the same weights."""
    torch.manual_seed(0)
    return build_model(tiny_config(tmp_path, weights, **loss))


def make_batch(batch_size: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [B,3,32,32], input_ids [B,9] with cls/sep/pad, attention_mask) for VOCAB."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=gen)
    ids = torch.randint(5, len(VOCAB), (batch_size, 9), generator=gen)
    ids[:, 0] = TOKENS.cls
    lengths = torch.tensor(CAPTION_LENGTHS)[torch.arange(batch_size) % len(CAPTION_LENGTHS)]
    positions = torch.arange(9)
    ids[positions[None] == lengths[:, None] - 1] = TOKENS.sep
    ids[positions[None] >= lengths[:, None]] = TOKENS.pad
    return images, ids, (ids != TOKENS.pad).long()


def tiny_corpus(path: Path, num_train: int, captions_per_image: int = 2) -> dict[str, str]:
    """A synthetic caption corpus of 32 px images (`generate_corpus` paths: train, image_root, bert)."""
    return generate_corpus(str(path), num_train=num_train, num_test=2, image_size=32,
                           captions_per_image=captions_per_image)


def pretrain_config(corpus: dict[str, str], output_dir: Path, *overrides: str) -> Config:
    """configs/test_tiny.yaml pointed at `corpus`, writing to `output_dir`, plus `overrides`."""
    return load_config(str(TINY_YAML), [
        f"output_dir={output_dir}", f"data.train_files=[{corpus['train']}]",
        f"data.image_root={corpus['image_root']}", f"model.text.bert={corpus['bert']}",
        "data.num_workers=0", *overrides,
    ])


def assert_same(a, b, where: str = "state") -> None:
    """Recursive exact equality of nested checkpoint-like structures, naming the first difference."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> tuple[str, str]:
    """Run `torchrun --standalone --nproc_per_node=nproc ARGS` on CPU; returns (stdout, stderr).

    The launcher gets its own process group so that a hang takes its workers down with it.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-4000:]
    return stdout, stderr


# ----------------------------------------------------------------------------- the original's checkpoints

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = Path(os.environ.get("ALBEF_ORIGINAL_DIR", ROOT.parent / "shared" / "albef_original"))
DOWNSTREAM = ORIGINAL / "downstream"
BERT_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def needs_original(*files: Path):
    """Skip marker for tests that read checkpoints the original ALBEF code wrote (../shared)."""
    missing = [f for f in files if not f.exists()]
    return __import__("pytest").mark.skipif(
        bool(missing), reason=f"checkpoints written by the original ALBEF code not found: {missing} "
        "(they live in ../shared/albef_original, or set ALBEF_ORIGINAL_DIR)")


def write_original_bert(path: Path, config_json: Path) -> Path:
    """A BERT dir with one of the original's tiny configs and a bert-base-uncased-sized vocab
    (special token ids as BERT's), as the original's tiny checkpoints need."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config_json.read_text())
    (path / "vocab.txt").write_text("\n".join(BERT_SPECIAL.get(i, f"tok{i}") for i in range(30522)) + "\n")
    return path
