"""Retrieval fine-tuning: `--init-from` the original's checkpoints and ours, the declared key
rules, training + evaluation on the engine, best.pt, and `--evaluate` reproducing its recall."""
import json
from pathlib import Path

import pytest
import torch

from albef.checkpoint import load_checkpoint_file, map_albef_keys, read_model_state, resample_pos_embed
from albef.config import Config
from albef.engine.trainer import init_weights
from albef.tasks.retrieval import RetrievalTask
from conftest import DOWNSTREAM, ORIGINAL, needs_original, write_original_bert

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16, "mlp_ratio": 4.0}
MLM_HEADS = ("text_encoder.cls.", "text_encoder_m.cls.")


def _retrieval_config(bert_dir: Path, image_size: int = 96, fusion_layer: int = 6, **model) -> Config:
    """Our retrieval config matching the original's Retrieval_coco_tiny.yaml."""
    return Config.from_dict({
        "model": {"embed_dim": 32, "queue_size": 16, "temp": 0.07,
                  "vision": {"image_size": image_size, "pretrained": False, **TINY_VIT},
                  "text": {"bert": str(bert_dir), "pretrained": False, "fusion_layer": fusion_layer}, **model},
        "loss": {"weights": {"itc": 1.0, "itm": 1.0, "mlm": 0.0}, "same_id_positives": True},
    })


@pytest.fixture(scope="module")
def bert_l12(tmp_path_factory):
    return write_original_bert(tmp_path_factory.mktemp("bert_l12"), DOWNSTREAM / "configs" / "config_bert_tiny_l12.json")


@pytest.fixture(scope="module")
def bert_l4(tmp_path_factory):
    return write_original_bert(tmp_path_factory.mktemp("bert_l4"), ORIGINAL / "config_bert_tiny.json")


def _init(cfg: Config, path: Path):
    task = RetrievalTask()
    torch.manual_seed(0)
    model = task.build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_weights(task, model, path, cfg)
    return model, fresh, report


@needs_original(DOWNSTREAM / "tiny_retrieval.pth")
def test_the_originals_retrieval_checkpoint_loads_with_nothing_missing_and_its_temp(bert_l12):
    path = DOWNSTREAM / "tiny_retrieval.pth"
    model, _, report = _init(_retrieval_config(bert_l12), path)
    assert not (report.skipped or report.new or report.resampled or report.reinitialised)
    assert set(report.unexpected) <= {"text_encoder.bert.embeddings.position_ids",
                                      "text_encoder_m.bert.embeddings.position_ids"}
    source = map_albef_keys(load_checkpoint_file(path)["model"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key]), key
    assert model.temp.item() == pytest.approx(0.08)  # the checkpoint's, not the config's 0.07
    assert model.idx_queue.tolist() == [[5, 1, 7, 0, 2, 3, 1, 6] + [-100] * 8]
    # the forward uses it: ITC logits are similarities / 0.08
    batch = torch.randn(2, 3, 96, 96), torch.tensor([[101, 7, 9, 102], [101, 8, 102, 0]])
    out = model(batch[0], batch[1], (batch[1] > 0).long(), alpha=0.0, ids=torch.tensor([0, 1]))
    assert torch.isfinite(out["loss"]) and model.temp.item() == pytest.approx(0.08)


@needs_original(DOWNSTREAM / "tiny_pretrain_l12.pth")
def test_init_from_the_originals_pretraining_follows_retrieval_py(bert_l12):
    """Retrieval.py: pos_embed of both ViTs interpolated (64 -> 96 px), `bert.` stripped (ours
    keeps it on both sides), MLM heads dropped, queues taken, idx_queue left at its marker."""
    path = DOWNSTREAM / "tiny_pretrain_l12.pth"
    model, fresh, report = _init(_retrieval_config(bert_l12), path)
    source = map_albef_keys(load_checkpoint_file(path)["model"])
    assert sorted(report.resampled) == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    assert sorted(report.skipped) == sorted(k for k in source if k.startswith(MLM_HEADS))
    assert report.new == ["idx_queue"] and not report.reinitialised
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("pos_embed"):
            assert torch.equal(value, resample_pos_embed(source[key], (6, 6))), key
        elif key == "idx_queue":
            assert torch.equal(value, fresh[key]) and (value < 0).all()
        else:
            assert torch.equal(value, source[key]), key
    assert len(report.loaded) + 1 == len(state)  # everything but idx_queue came from the file


@needs_original(ORIGINAL / "tiny_albef_pretrain.pth")
def test_init_from_the_4_layer_original_pretraining_at_another_resolution(bert_l4):
    cfg = _retrieval_config(bert_l4, image_size=96, fusion_layer=2)
    model, _, report = _init(cfg, ORIGINAL / "tiny_albef_pretrain.pth")
    assert sorted(report.resampled) == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    assert report.skipped and all(k.startswith(MLM_HEADS) for k in report.skipped)
    assert model.visual_encoder.pos_embed.shape == (1, 37, 64)
    assert model.temp.item() == pytest.approx(load_checkpoint_file(ORIGINAL / "tiny_albef_pretrain.pth")["model"]["temp"].item())


@needs_original(DOWNSTREAM / "tiny_pretrain_l12.pth")
def test_fresh_queues_switch(bert_l12):
    cfg = _retrieval_config(bert_l12, init_queues="fresh")
    model, fresh, report = _init(cfg, DOWNSTREAM / "tiny_pretrain_l12.pth")
    for key in ("image_queue", "text_queue", "queue_ptr", "idx_queue"):
        assert torch.equal(model.state_dict()[key], fresh[key]), key
        assert key in report.new


def test_a_file_of_another_model_fails_in_one_line(tmp_path, bert_l12):
    cfg = _retrieval_config(bert_l12)
    task = RetrievalTask()
    model = task.build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if k != "itm_head.bias"}
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "other.pth")
    from albef.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"missing keys 1 \(itm_head.bias\).*unexpected keys 1 \(extra.weight\)") as err:
        init_weights(task, task.build_model(cfg), tmp_path / "other.pth", cfg)
    assert "\n" not in str(err.value)


def test_init_from_reads_the_model_of_a_dcp_checkpoint(tmp_path):
    """An FSDP run's `.dcp` directory seeds a run directly (no conversion to one file)."""
    from albef.engine.fsdp import save_dcp_checkpoint
    from albef.engine.optim import build_optimizer
    from albef.build import build_model
    from conftest import tiny_config

    cfg = tiny_config(tmp_path)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    path = save_dcp_checkpoint(model, optimizer, {"train_state": {}}, tmp_path / "ckpt", 3, keep_last=2)
    state = read_model_state(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert read_model_state(tmp_path / "ckpt").keys() == state.keys()  # the checkpoints dir: its newest


# ----------------------------------------------------------------------------- end to end on the engine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from albef.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(str(out), num_train=48, num_test=12, image_size=32, captions_per_image=2)
    return out


def _common(corpus: Path, run: Path) -> list[str]:
    return ["--config", str(CONFIGS / "test_tiny.yaml"), "--output-dir", str(run),
            f"model.text.bert={corpus / 'bert'}", f"data.train_files=[{corpus / 'train.json'}]",
            f"data.image_root={corpus}", f"eval.image_root={corpus}"]


def without_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("time_")}


def test_pretrain_then_finetune_then_evaluate_reproduces_recall(corpus, tmp_path, capsys):
    from albef.pretrain import main as pretrain
    from albef.tasks.retrieval import main as retrieval

    assert pretrain(_common(corpus, tmp_path / "pre") + ["train.max_steps=2"]) == 0
    test = f"eval.test_files=[{corpus / 'test.json'}]"
    finetune = _common(corpus, tmp_path / "ft") + [
        "--init-from", str(tmp_path / "pre"),  # a run directory: its newest checkpoint
        "model.vision.image_size=48",  # another resolution: 4x4 -> 6x6 patches
        "loss.weights.mlm=0", "loss.same_id_positives=true", "train.max_steps=3",
        f"eval.val_files=[{corpus / 'test.json'}]", test]
    assert retrieval(finetune) == 0
    err = capsys.readouterr().err
    assert "resampled: visual_encoder.pos_embed, visual_encoder_m.pos_embed" in err
    assert "skipped (unused): idx_queue, text_encoder.cls.predictions.* " in err
    run = tmp_path / "ft"
    assert (run / "best.pt").is_file()
    tested = json.loads((run / "results" / "test_latest.json").read_text())
    assert 0 <= tested["r_mean"] <= 100 and "itm_itc_r_mean" in tested

    # a second --init-from of its own output (best.pt) reproduces the recall under --evaluate
    again = _common(corpus, tmp_path / "eval") + ["--evaluate", "--init-from", str(run / "best.pt"),
                                                  "model.vision.image_size=48", "loss.weights.mlm=0", test]
    assert retrieval(again) == 0
    assert "new (freshly" not in capsys.readouterr().err
    reproduced = json.loads((tmp_path / "eval" / "results" / "test_latest.json").read_text())
    assert without_timings(reproduced) == without_timings(tested)

    # --resume auto of the finished fine-tuning run continues it, not the init weights
    assert retrieval(finetune + ["--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
