"""`albef plan`: the traced step's state bytes are the model's exact counts, activations grow
linearly with the batch and shrink with checkpointing, FSDP divides the sharded categories, the
largest-batch search brackets the boundary, and the time is FLOPs / (peak x MFU)."""

import json
import math

import pytest
import torch

from albef.engine.optim import build_optimizer
from albef.flops import step_flops
from albef.build import build_model
from albef.plan import (GIB, GPU, Margins, StepTracer, benchmark_rates, example_batch, fits, largest_batch, main,
                        per_gpu_memory, plan, sized_bert_dir, step_seconds, with_checkpointing)
from albef.tasks.pretrain import PretrainTask
from conftest import TINY_YAML, tiny_config, write_tiny_bert

pytestmark = pytest.mark.slow  # fake-tensor traces of whole training steps

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def tracers(cfg):
    """One fake-tensor tracer per (precision, checkpointing), built on first use."""
    made = {}

    def get(precision: str = "fp32", ckpt: bool = False) -> StepTracer:
        if (precision, ckpt) not in made:
            made[precision, ckpt] = StepTracer("pretrain", with_checkpointing(cfg, ckpt), PRECISIONS[precision])
        return made[precision, ckpt]

    return get


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_state_bytes_are_the_models_exact_counts(cfg, tracers, precision):
    traced = tracers(precision).trace(4)
    # the same step on real tensors: weights, gradients after backward, AdamW states after its step
    torch.manual_seed(0)
    task = PretrainTask()
    model = task.build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    batch = example_batch("pretrain", model, cfg, 4)
    batch["images"] = torch.randn(batch["images"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = task.forward_step(model, batch, 0.4)
    out["loss"].backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    assert traced.params == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert traced.momentum_params == sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert traced.gradients == grads == traced.params  # fp32 master gradients under bf16 autocast too
    assert traced.optimizer == states
    assert traced.buffers == sum(b.numel() * b.element_size() for b in model.buffers())
    assert traced.peak > traced.params + traced.momentum_params + traced.optimizer


def test_activations_grow_linearly_with_the_batch(tracers):
    tracer = tracers()
    a2, a4, a6 = (tracer.trace(b).activations for b in (2, 4, 6))
    assert a2 < a4 < a6
    # equal steps in batch, equal steps in activations, up to what is not linear in the batch: the
    # B x B similarity matrices (ITC in-batch part, ITM negative sampling) and the number of MLM
    # tokens drawn (2.6% of a step here, with a queue of 8; far less at real sizes)
    assert abs((a6 - a4) - (a4 - a2)) <= 0.05 * (a6 - a4)


def test_checkpointing_lowers_the_activations(tracers):
    plain, ckpt = tracers("fp32", False).trace(4), tracers("fp32", True).trace(4)
    assert ckpt.activations < plain.activations
    assert (ckpt.params, ckpt.gradients, ckpt.optimizer) == (plain.params, plain.gradients, plain.optimizer)


@pytest.mark.parametrize("gpus", [2, 4])
def test_fsdp_divides_the_sharded_categories_by_n(tracers, gpus):
    traced = tracers().trace(4)
    ddp, fsdp = per_gpu_memory(traced, "ddp", 1, 2), per_gpu_memory(traced, "fsdp", gpus, 2)
    for key in ("weights", "momentum_weights", "gradients", "adamw_states"):
        assert fsdp[key] == math.ceil(ddp[key] / gpus)
    assert (fsdp["queues"], fsdp["activations"]) == (ddp["queues"], ddp["activations"])
    assert fsdp["fsdp_gathered_units"] == 2 * traced.largest_unit // 2  # two bf16 copies of the largest block
    assert per_gpu_memory(traced, "ddp", gpus, 2)["ddp_grad_buckets"] == traced.gradients


def test_largest_batch_search_brackets_the_boundary(tracers):
    tracer = tracers()
    margins = Margins(fragmentation=0.1, context_gib=0.0)

    def peak_at(b: int) -> int:
        return sum(per_gpu_memory(tracer.trace(b), "ddp", 1, 4).values())

    memory = int(peak_at(5) * 1.1) + 1000  # batch 5 fits, 6 does not
    for guess in (1, 5, 9):
        found = largest_batch(peak_at, memory, guess, margins)
        assert found == 5
        assert fits(peak_at(found), memory, margins) and not fits(peak_at(found + 1), memory, margins)
    assert largest_batch(peak_at, peak_at(1) // 2, 3, margins) == 0  # not even batch 1


def test_largest_batch_search_on_a_line():
    for memory in (10, 57, 1000):
        for guess in (1, 3, 40, 500):
            found = largest_batch(lambda b: 7 * b, memory, guess, Margins(0.0, 0.0))
            assert 7 * found <= memory < 7 * (found + 1)


def test_time_is_flops_over_peak_times_mfu(cfg, tmp_path):
    gpu = GPU(memory_mib=80 * 1024, bf16_tflops=100.0)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "achieved_tflops": 40.0, "batch_size": 64,
                                 "data_pipeline": [{"decode": "workers", "format": "json", "workers": 4,
                                                    "images_per_s_per_worker": 50.0}]}))
    report = plan(cfg, "pretrain", gpu, gpus=8, benchmark=str(bench), samples=12_800, search=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = example_batch("pretrain", model, cfg, cfg.train.batch_size)
    flops = step_flops(model, cfg.train.batch_size, cfg.data.max_tokens, len(batch["mlm_position"]))["step"]
    t = report["time"]
    assert t["flops_per_step"] == flops
    assert t["mfu"] == pytest.approx(0.4)  # 40 achieved / 100 peak
    step = flops / (100e12 * 0.4)
    assert t["step_s"] == pytest.approx(step) == pytest.approx(step_seconds(flops, 100.0, 0.4))
    assert t["pairs_per_s"] == pytest.approx(cfg.train.batch_size * 8 / step)
    assert t["epoch_s"] == pytest.approx(12_800 // (cfg.train.batch_size * 8) * step)
    assert t["total_s"] == pytest.approx(t["epoch_s"] * cfg.train.epochs)
    assert t["workers_per_gpu"] == math.ceil(t["pairs_per_s"] / 8 / 50.0)
    assert report["eval_token_store"]["bytes"] > 0  # pretraining evaluates retrieval
    assert benchmark_rates(None, 100.0)["mfu_source"].startswith("default")


def test_sized_bert_dir_needs_no_download(tmp_path):
    from transformers import BertConfig

    path = sized_bert_dir("bert-base-uncased", tmp_path / "bert")
    config = BertConfig.from_pretrained(path)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (30522, 768, 12)
    assert len((tmp_path / "bert" / "vocab.txt").read_text().splitlines()) == 30522
    local = write_tiny_bert(tmp_path / "tiny")
    assert sized_bert_dir(str(local), tmp_path / "unused") == str(local)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    bert = write_tiny_bert(tmp_path / "bert")
    out = tmp_path / "plan.json"
    args = ["--config", str(TINY_YAML), "--gpu", "rtx3090", "--gpus", "2", "--no-search", "--json", str(out),
            f"model.text.bert={bert}", "model.text.fusion_layer=2", "train.precision=bf16"]
    from albef.command import main as albef

    assert albef(["plan", *args]) == 0
    printed = capsys.readouterr().out
    assert "activations" in printed and "predictions" in printed
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16" and report["gpu"]["memory_mib"] == 24576
    assert set(report["memory"]) == {"no_checkpointing", "checkpointing"}
    assert report["memory"]["no_checkpointing"]["ddp"]["fits"]
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: albef plan:")
