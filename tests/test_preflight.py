"""User mistakes that used to end in a traceback once the model was built: each one is now one
line on stderr and exit 2 from `python -m albef.pretrain`, naming the key or file, before
anything is built (the Trainer's config.yaml is never written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from albef.build import check_model_config
from albef.config import ConfigError, load_config
from albef.data.datasets import check_data_files
from conftest import tiny_corpus, write_tiny_bert

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "test_tiny.yaml"
PRETRAIN = ROOT / "configs" / "pretrain.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("preflight"), num_train=4)


def run_cli(config: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "albef.pretrain", "--config", str(config), "--output-dir",
                           str(out), *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def corpus_overrides(corpus: dict) -> list[str]:
    return [f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
            f"model.text.bert={corpus['bert']}"]


def bad_annotations(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.json"
    path.write_text({
        "not json": '[{"image": "a.jpg", "caption": "x"',
        "not a list": '{"image": "a.jpg", "caption": "x"}',
        "no image": json.dumps([{"image": "a.jpg", "caption": "x"}, {"caption": "y"}]),
    }[kind])
    return path


@pytest.mark.parametrize("kind, message", [
    ("not json", "invalid JSON at line 1"), ("not a list", "expected a JSON list"),
    ("no image", "entry 1: 'image' must be"),
])
def test_malformed_annotation_file(corpus, tmp_path, kind, message):
    bad = bad_annotations(tmp_path, kind)
    result = run_cli(TINY, tmp_path / "run", *corpus_overrides(corpus), f"data.train_files=[{bad}]")
    assert_one_line_exit_2(result, tmp_path / "run", "data.train_files[0]", str(bad), message)


def test_missing_shards(corpus, tmp_path):
    pattern = str(tmp_path / "shards" / "cc-{000..003}.tar")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "cc-000.tar").write_bytes(b"")
    result = run_cli(TINY, tmp_path / "run", *corpus_overrides(corpus), "data.format=wds",
                     f"data.shards={pattern}", "data.num_samples=8")
    assert_one_line_exit_2(result, tmp_path / "run", "data.shards", str(tmp_path / "shards" / "cc-001.tar"),
                           "3 of 4 shards missing")


@pytest.mark.parametrize("override, key, message", [
    ("model.text.config_overrides.hidden_size=30", "model.text.config_overrides.hidden_size",
     "hidden_size 30 is not divisible by num_attention_heads 4"),
    ("model.vision.arch=vit_tiny_patch16_2244", "model.vision.arch", "did you mean 'vit_tiny_patch16_224'"),
])
def test_model_sizes_timm_does_not_have(corpus, tmp_path, override, key, message):
    result = run_cli(TINY, tmp_path / "run", *corpus_overrides(corpus), override)
    assert_one_line_exit_2(result, tmp_path / "run", key, message)


def test_fusion_layer_beyond_the_bert_layers(corpus, tmp_path):
    """The BERT's own config.json sets the layer count (no num_hidden_layers override)."""
    config = tmp_path / "config.yaml"
    config.write_text(f"base: {PRETRAIN}\nmodel: {{text: {{pretrained: false, fusion_layer: 13}}}}\n")
    bert = write_tiny_bert(tmp_path / "bert", num_hidden_layers=12)
    result = run_cli(config, tmp_path / "run", f"data.train_files=[{corpus['train']}]",
                     f"data.image_root={corpus['image_root']}", f"model.text.bert={bert}")
    assert_one_line_exit_2(result, tmp_path / "run", "model.text.fusion_layer", "must be <= the BERT's 12 layers")


def assert_one_line_exit_2(result: subprocess.CompletedProcess, run: Path, *names: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[-3000:]
    for name in names:
        assert name in result.stderr, (name, result.stderr)
    assert not (run / "config.yaml").exists()  # stopped before the Trainer was built


def test_checks_pass_a_good_config_and_the_eval_files(corpus, tmp_path):
    cfg = load_config(str(TINY), corpus_overrides(corpus))
    check_data_files(cfg)
    check_model_config(cfg)
    bad = bad_annotations(tmp_path, "no image")
    with pytest.raises(ConfigError, match=r"eval\.test_files\[0\]: .*no image\.json: entry 1"):
        check_data_files(load_config(str(TINY), [*corpus_overrides(corpus), f"eval.test_files=[{bad}]"]))
