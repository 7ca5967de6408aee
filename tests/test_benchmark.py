"""The analytic FLOPs of albef/flops.py against torch's FlopCounterMode, and scripts/benchmark.py
end to end on a tiny model (step report, per-phase times, data pipeline, A/B mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from albef.flops import step_flops
from albef.models.albef import mask_tokens
from conftest import make_batch, make_model, write_tiny_bert

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def matmul_only_attention(model) -> None:
    """FlopCounterMode does not count CPU fused attention: use the matmul forms it does count."""
    for vit in (model.visual_encoder, model.visual_encoder_m):
        for block in vit.blocks:
            block.attn.fused_attn = False
    for text in (model.text_encoder, model.text_encoder_m):
        for layer in text.bert.encoder.layer:
            for attention in (layer.attention, layer.crossattention):
                if attention is not None:
                    attention.self.attention = "eager"


@pytest.mark.parametrize("batch_size", [3, 6])
def test_analytic_flops_match_flop_counter(tmp_path, batch_size):
    write_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = make_model(tmp_path)
    matmul_only_attention(model)
    images, ids, mask = make_batch(batch_size)
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        out = model(images, ids, mask, alpha=0.4)
        out["loss"].backward()
    torch.manual_seed(0)  # the forward's first random draws are the MLM masks
    labels = mask_tokens(ids, model.mlm_probability, model.token_ids, model.text_encoder.config.vocab_size)[1]
    flops = step_flops(model, batch_size, ids.shape[1], int((labels != -100).sum()))
    assert flops["step"] == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert flops["step"] > 3 * flops["online_forward"] > 0  # plus the momentum forward


def run_benchmark(tmp_path, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmark_smoke_writes_the_report(tmp_path):
    out = run_benchmark(tmp_path, "--smoke", "--data-workers", "0", "--json", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("pairs_per_s", "ms_per_step", "peak_rss_gib", "analytic_gflop_per_step", "achieved_tflops",
                "matmul_tflops", "mfu_vs_measured_matmul", "counted_gflop_per_step"):
        assert report[key] > 0, key
    for phase in ("vit", "vit_m", "text", "text_m", "fusion", "fusion_m", "mlm_head", "backward", "optimizer",
                  "ema", "queue"):
        assert phase in report["phases_ms"], phase
    assert {(row["decode"], row["format"], row["workers"]) for row in report["data_pipeline"]} == {
        (decode, fmt, 0) for decode in ("workers", "device") for fmt in ("json", "wds")}
    assert all(row["images_per_s"] > 0 for row in report["data_pipeline"])
    assert all(row["device_images_per_s"] > 0 for row in report["data_pipeline"] if row["decode"] == "device")
    assert "pairs/s" in out and "MFU" in out


def test_benchmark_compare_alternates_two_trees(tmp_path):
    out = run_benchmark(tmp_path, "--preset", "smoke", "--compare", str(REPO), "--rounds", "2", "--steps", "1",
                        "--phase-steps", "1", "--warmup", "1", "--json", str(tmp_path / "ab.json"))
    report = json.loads((tmp_path / "ab.json").read_text())
    assert len(report["round_ratios"]) == 2 and report["ratio_of_medians"] > 0
    assert set(report["phases_ms"]) == {"this", "other"} and "backward" in report["phases_ms"]["other"]
    assert "ratio" in out
