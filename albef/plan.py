"""`albef plan`: the memory, batch, time and data workers a run needs, before paying for GPUs.

    albef plan --config configs/pretrain.yaml --gpu a100-40gb --gpus 8 [--task pretrain]
               [--benchmark bench.json] [--json plan.json] [key.sub=value ...]

Memory comes from tracing one real training step of the task's model -- forward under the
run's autocast, backward, AdamW step, EMA and queue update, as the trainer runs them -- under
`torch._subclasses.FakeTensorMode` with `torch.distributed._tools.mem_tracker.MemTracker`:
every tensor has its real shape and dtype and no storage, so the full ViT-B / BERT-base model
is planned on a laptop in seconds. Nothing is loaded or downloaded: weights are random (fake),
and a BERT named by a hub id is replaced by its sizes (bert-base-uncased: BertConfig's
defaults) with a generated vocabulary.

What is traced (exact sizes of the tensors the step allocates, on the CPU's kernels):
parameters, momentum parameters, gradients, AdamW states, queues (buffers), and the peak of
the step (activations = peak minus the state alive at that moment). What is estimated on top:
allocator fragmentation (`FRAGMENTATION` of the traced peak), the CUDA context and kernel
workspaces (`CUDA_CONTEXT_GIB`, which `torch.cuda.max_memory_allocated` does not see), DDP's
gradient buckets (one copy of the gradients), and under FSDP2 the gathered units; FSDP2 is not
traced but derived: parameters, gradients and AdamW states divided by N, plus two gathered
blocks in the compute dtype (the one computing and the one prefetched). The reason: tracing
`fully_shard` in one process needs a process group over N fake ranks, which torch offers only
in its private testing package (`torch.testing._internal.distributed.fake_pg`); the planner
uses public APIs only.

Time: the step's FLOPs (albef/flops.py for the ALBEF pretraining model; for the other tasks'
models, `torch.utils.flop_counter.FlopCounterMode` over the same traced step) divided by the
GPU's dense bf16 peak times an MFU (from a scripts/benchmark.py JSON, else `DEFAULT_MFU`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

GIB = 2**30
MIB = 2**20

# ----------------------------------------------------------------------------- the GPU table


@dataclass(frozen=True)
class GPU:
    memory_mib: int  # total memory as nvidia-smi reports it
    bf16_tflops: float  # dense (no sparsity) peak, fp32 accumulate
    note: str = ""


# The one GPU table (vendor datasheets; --gpu-memory / --gpu-tflops override).
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU(81559, 989.0, "H100 SXM5"),
    "h100-pcie": GPU(81559, 756.0, "H100 PCIe"),
    "h200": GPU(143771, 989.0, "H200 SXM"),
    "a100-40gb": GPU(40960, 312.0),
    "a100-80gb": GPU(81920, 312.0),
    "l40s": GPU(46068, 362.0),
    "a10": GPU(23028, 125.0),
    "rtx4090": GPU(24564, 165.2, "fp32 accumulate (330 with fp16 accumulate)"),
    "rtx3090": GPU(24576, 71.0, "fp32 accumulate (142 with fp16 accumulate)"),
    "v100-32gb": GPU(32768, 125.0, "no bf16: the figure is fp16; run with train.precision=fp16"),
    "v100-16gb": GPU(16384, 125.0, "no bf16: the figure is fp16; run with train.precision=fp16"),
}

FRAGMENTATION = 0.10  # allocator fragmentation / caching slack, as a fraction of the traced peak
CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS/cuDNN workspaces (not in max_memory_allocated)


@dataclass(frozen=True)
class Margins:
    """What is added to a traced peak before comparing it with the GPU's memory."""

    fragmentation: float = FRAGMENTATION
    context_gib: float = CUDA_CONTEXT_GIB

DEFAULT_MFU = 0.35  # assumed when no benchmark JSON is given
DEFAULT_IMAGES_PER_WORKER = 150.0  # images/s one loader worker decodes + augments, assumed without a benchmark
ALBEF_4M_PAIRS = 5_100_000  # ALBEF-4M: 4.0M images, 5.1M image-text pairs (paper, Table 1)
COCO_5K_TEST = (5000, 25010)  # images, captions of the Karpathy COCO test split

RETRIEVAL_EVAL_TASKS = ("pretrain", "retrieval")  # evaluate by encoding the whole split first


def trainable_tasks() -> list[str]:
    """The registered tasks with a training step (albef/registry.py); zero-shot only evaluates."""
    from albef.registry import tasks
    from albef.tasks.base import Task

    return [name for name, entry in tasks().items() if entry.cls.build_train_loader is not Task.build_train_loader]


def make_task(name: str) -> Any:
    from albef.registry import get_task

    entry = get_task(name)
    if entry is None or name not in trainable_tasks():
        raise ValueError(f"--task {name}: not a registered task with a training step ({', '.join(trainable_tasks())})")
    return entry.cls()


# ----------------------------------------------------------------------------- config without downloads


def sized_bert_dir(name_or_dir: str, out: Path) -> str:
    """`name_or_dir` when it is a local BERT directory; else a directory in `out` with the hub
    model's sizes (bert-base-uncased: BertConfig's defaults; others from the local HF cache) and
    a generated vocabulary of its size (BERT's special token ids kept). Nothing is downloaded."""
    from transformers import BertConfig

    if Path(name_or_dir, "config.json").is_file():
        return name_or_dir
    if name_or_dir == "bert-base-uncased":
        config = BertConfig()
    else:
        try:
            config = BertConfig.from_pretrained(name_or_dir, local_files_only=True)
        except OSError:
            raise ValueError(f"model.text.bert: {name_or_dir!r} is neither a local BERT directory nor in the "
                             "local Hugging Face cache; point it at a directory with config.json") from None
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + [f"w{i}" for i in range(config.vocab_size - len(specials))]
    (out / "vocab.txt").write_text("\n".join(words[: config.vocab_size]) + "\n")
    config.save_pretrained(out)
    return str(out)


def planning_config(config: str, overrides: Sequence[str], bert_dir: Path):
    """The run's config with nothing to load: random weights, no init checkpoint, no compile."""
    from albef.config import load_config

    cfg = load_config(config, list(overrides))
    tcfg = cfg.model.text
    tokenizer = tcfg.tokenizer or tcfg.bert
    tcfg.bert = sized_bert_dir(tcfg.bert, bert_dir)
    tcfg.tokenizer = tokenizer if Path(tokenizer).is_dir() else tcfg.bert  # a hub tokenizer: the generated vocab
    tcfg.pretrained = False
    cfg.model.vision.pretrained, cfg.model.vision.checkpoint = False, None
    cfg.model.init_checkpoint = None
    cfg.train.compile = False
    return cfg


def with_checkpointing(cfg, enabled: bool):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.vision.grad_checkpointing = cfg.model.text.grad_checkpointing = enabled
    return cfg


# ----------------------------------------------------------------------------- one batch of each task


def example_batch(task: str, model, cfg, batch_size: int) -> dict[str, Any]:
    """A real-shaped batch of `task` as its loader yields it: images of model.vision.image_size,
    captions of data.max_tokens tokens (the longest padding length), MLM masks as the collate
    draws them. Real (small) tensors; the planner turns them into fake ones."""
    import torch

    gen = torch.Generator().manual_seed(0)
    size, length = cfg.model.vision.image_size, cfg.data.max_tokens
    vocab = model.text_encoder.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch_size, length), generator=gen)
    ids[:, 0], ids[:, -1] = 101 if vocab > 103 else 2, 102 if vocab > 103 else 3  # [CLS] ... [SEP]
    mask = torch.ones(batch_size, length, dtype=torch.long)
    images = (batch_size, 2, 3, size, size) if task == "nlvr" else (batch_size, 3, size, size)
    batch: dict[str, Any] = {"images": images, "input_ids": ids, "attention_mask": mask,
                             "ids": torch.arange(batch_size)}
    if task in ("ve", "nlvr"):
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=gen)
    if task == "vqa":
        answers = 2  # answers per question, each of 5 tokens
        batch = {"images": images, "question_ids": ids, "question_mask": mask,
                 "answer_ids": ids[:, :5].repeat_interleave(answers, 0),
                 "answer_mask": torch.ones(batch_size * answers, 5, dtype=torch.long),
                 "answer_weights": torch.full((batch_size * answers,), 0.5),
                 "answers_per_question": torch.full((batch_size,), answers)}
    masking = getattr(model, "mlm_probability", None)
    if task == "pretrain" and masking is not None and model.loss_weights["mlm"]:
        from albef.data.masking import MLMMasking

        mlm = MLMMasking(model.mlm_probability, model.token_ids, vocab, model.mlm_mask_sep)
        batch.update(mlm(ids, list(range(batch_size))))
    return batch


# ----------------------------------------------------------------------------- tracing one step


@dataclass
class StepTrace:
    """Bytes per GPU of one traced training step (DDP layout, one rank's view)."""

    batch_size: int
    params: int  # online (trainable) parameters
    momentum_params: int  # frozen parameters (momentum encoders)
    gradients: int
    optimizer: int  # AdamW exp_avg, exp_avg_sq, step
    buffers: int  # queues (and other buffers)
    peak: int  # traced peak of the step
    activations: int  # peak - the persistent state alive at the peak
    flops: int  # the step's FLOPs (forward + backward of the online model, momentum forward)
    flops_source: str
    largest_unit: int  # bytes of the largest ViT block / BERT layer (FSDP2's gathered unit)


class _NoHook:
    def remove(self) -> None:
        pass


def frozen_aware_tracker():
    """torch's MemTracker, accepting frozen parameters (the momentum encoders): it installs a
    gradient hook on every parameter a module runs with, which raises for those without grad;
    frozen ones are marked as hooked already (they never get a gradient to track)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # noqa: FBT002
            for param in module.parameters():
                if not param.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(param, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):
            # torch's also keeps each module's own peak, walking every module at every op (most
            # of a trace's time); the planner reads the global peak only, which this keeps exactly
            if any(snap.get("Total", 0) > self._peak_mem.get(dev, 0) for dev, snap in self._curr_mem_snap.items()):
                super()._update_peak_stats(peak_state)

    return Tracker()


def to_empty_keeping_ties(model, device) -> None:
    """`model.to_empty(device)`, with parameters shared between modules (the MLM decoder tied to
    the word embeddings) shared again afterwards: `to_empty` converts each module's copy apart."""
    owners: dict[int, tuple[Any, str]] = {}
    aliases = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in owners:
                aliases.append((module, name, owners[id(param)]))
            else:
                owners[id(param)] = (module, name)
    model.to_empty(device=device)
    for module, name, (owner, owner_name) in aliases:
        setattr(module, name, getattr(owner, owner_name))


class StepTracer:
    """The task's model and AdamW, built once on fake CPU tensors; `trace(b)` runs one training
    step at batch `b` under MemTracker, as the trainer runs it: forward (autocast to
    `amp_dtype`) after the EMA, backward, AdamW step, zero_grad, `after_optimizer_step` (enqueue).
    The AdamW states exist before the first trace (a step on zero gradients), so every traced
    step is a steady one."""

    def __init__(self, task_name: str, cfg, amp_dtype) -> None:
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        from albef.engine.optim import build_optimizer

        self.task_name, self.cfg, self.amp_dtype = task_name, cfg, amp_dtype
        self.task = make_task(task_name)
        cpu = torch.device("cpu")
        with torch.device("meta"):  # built without memory or values, then given fake CPU storage
            self.model = self.task.build_model(cfg).train()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors
        with self.fake:
            to_empty_keeping_ties(self.model, cpu)
            self.optimizer = build_optimizer(self.model, cfg.optim, cpu)
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            for p in trainable:
                p.grad = torch.zeros_like(p)
            self.optimizer.step()  # AdamW's states appear
            self.optimizer.zero_grad(set_to_none=True)

    def trace(self, batch_size: int) -> StepTrace:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from albef.engine.fsdp import transformer_blocks
        from albef.engine.trainer import update_momentum

        model, optimizer, task, fake = self.model, self.optimizer, self.task, self.fake
        real = example_batch(self.task_name, model, self.cfg, batch_size)
        with fake:
            batch = {k: torch.empty(v) if isinstance(v, tuple) else fake.from_tensor(v) for k, v in real.items()}
        analytic = self.task_name == "pretrain" and hasattr(model, "image_queue")
        counter = nullcontext() if analytic else FlopCounterMode(display=False)
        with fake:
            tracker = frozen_aware_tracker()
            tracker.track_external(model, optimizer, *[v for v in batch.values() if torch.is_tensor(v)])
            with tracker, counter:
                update_momentum(model)  # the engine's EMA, before the step's forward
                with torch.autocast("cpu", dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out = task.forward_step(model, batch, 0.4)
                out["loss"].backward()
                after_backward = tracker.get_tracker_snapshot("current")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                task.after_optimizer_step(model, [out])
                del out
            peak = tracker.get_tracker_snapshot("peak")

        def total(snap: dict, key: str) -> int:
            return sum(int(s.get(key, 0)) for s in snap.values())

        params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        peak_total = total(peak, "Total")
        persistent = sum(total(peak, k) for k in ("Parameter", "Buffer", "Gradient", "Optstate"))
        units = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in transformer_blocks(model)]
        if analytic:
            from albef.flops import step_flops

            masked = int(batch["mlm_position"].shape[0]) if "mlm_position" in batch else 0
            flops = step_flops(model, batch_size, self.cfg.data.max_tokens, masked)["step"]
            source = "albef/flops.py (analytic)"
        else:
            flops, source = counter.get_total_flops(), "FlopCounterMode over the traced step"
        return StepTrace(
            batch_size=batch_size, params=params, momentum_params=frozen,
            gradients=total(after_backward, "Gradient"), optimizer=total(peak, "Optstate"),
            buffers=total(peak, "Buffer"), peak=peak_total, activations=peak_total - persistent,
            flops=int(flops), flops_source=source, largest_unit=max(units, default=0))


def trace_step(task_name: str, cfg, batch_size: int, amp_dtype) -> StepTrace:
    """One traced training step of a freshly built model (see `StepTracer`)."""
    return StepTracer(task_name, cfg, amp_dtype).trace(batch_size)


# ----------------------------------------------------------------------------- memory per strategy


def per_gpu_memory(trace: StepTrace, strategy: str, gpus: int, compute_bytes: int) -> dict[str, int]:
    """Bytes per GPU by category for `strategy` ('ddp' | 'fsdp') at `gpus` ranks.

    DDP: the traced step, plus DDP's gradient buckets (a second copy of the gradients) when N > 1.
    FSDP2: parameters, gradients and AdamW states / N; plus two gathered units in the compute
    dtype (`compute_bytes` per element: the unit running and the one prefetched)."""
    shard = gpus if strategy == "fsdp" and gpus > 1 else 1
    memory = {
        "weights": math.ceil(trace.params / shard),
        "momentum_weights": math.ceil(trace.momentum_params / shard),
        "gradients": math.ceil(trace.gradients / shard),
        "adamw_states": math.ceil(trace.optimizer / shard),
        "queues": trace.buffers,
        "activations": trace.activations,
    }
    if strategy == "ddp" and gpus > 1:
        memory["ddp_grad_buckets"] = trace.gradients
    if shard > 1:
        memory["fsdp_gathered_units"] = 2 * trace.largest_unit // 4 * compute_bytes
    return memory


def eval_token_store(task: str, model_shapes: dict[str, int], cfg, gpus: int, storage_bytes: int,
                     split_sizes: tuple[int, int]) -> int:
    """Bytes per GPU that retrieval evaluation keeps while re-ranking: this rank's image tokens
    (in the storage dtype), every caption's states and masks, all ITC features, the similarity
    matrix (albef/tasks/retrieval.py). 0 for tasks that evaluate batch by batch."""
    if task not in RETRIEVAL_EVAL_TASKS:
        return 0
    images, texts = split_sizes
    s = model_shapes
    image_tokens = math.ceil(images / gpus) * s["image_tokens"] * s["vision_width"] * storage_bytes
    text_states = texts * cfg.eval.max_tokens * (s["text_width"] * 4 + 8)
    feats = (images + texts) * s["embed_dim"] * 4
    sims = images * texts * 4
    return image_tokens + text_states + feats + sims


def split_sizes(cfg) -> tuple[tuple[int, int], str]:
    """(images, captions) of the evaluation split: counted from eval.test_files (or val_files)
    when they can be read, else COCO's 5k test split."""
    files = list(cfg.eval.test_files or cfg.eval.val_files or [])
    try:
        entries = [e for f in files for e in json.loads(Path(f).read_text())]
    except (OSError, ValueError):
        entries = []
    if entries:
        texts = sum(len(e["caption"]) if isinstance(e.get("caption"), list) else 1 for e in entries)
        return (len(entries), texts), f"counted in {', '.join(files)}"
    return COCO_5K_TEST, "COCO 5k test split (5,000 images, 25,010 captions; no eval files readable)"


# ----------------------------------------------------------------------------- fitting


def with_margin(total_bytes: int, margins: Margins = Margins()) -> int:
    return int(total_bytes * (1 + margins.fragmentation) + margins.context_gib * GIB)


def fits(total_bytes: int, memory_bytes: int, margins: Margins = Margins()) -> bool:
    return with_margin(total_bytes, margins) <= memory_bytes


def largest_batch(peak_at: Any, memory_bytes: int, guess: int, margins: Margins = Margins(),
                  limit: int = 1 << 16) -> int:
    """The largest batch b >= 1 with fits(peak_at(b)) and not fits(peak_at(b + 1)); 0 if batch 1
    does not fit. `peak_at(b)` is a traced peak (bytes per GPU); `guess` is where to start (a
    linear extrapolation): the search walks from it, doubling the step until it brackets the
    boundary, then bisects, so it traces a few batches only."""
    cache: dict[int, bool] = {}

    def ok(b: int) -> bool:
        if b not in cache:
            cache[b] = fits(peak_at(b), memory_bytes, margins)
        return cache[b]

    lo = max(1, min(guess, limit))
    if not ok(lo):
        hi, step = lo, 1
        while True:  # walk down until a batch fits
            lo = max(1, hi - step)
            if ok(lo):
                break
            if lo == 1:
                return 0
            hi, step = lo, step * 2
    else:
        step = 1
        while True:  # walk up until a batch does not fit
            hi = min(limit, lo + step)
            if not ok(hi):
                break
            if hi == limit:
                return limit
            lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- time


def step_seconds(flops: float, peak_tflops: float, mfu: float) -> float:
    """The step time: FLOPs / (peak FLOP/s x MFU)."""
    return flops / (peak_tflops * 1e12 * mfu)


def benchmark_rates(path: str | None, peak_tflops: float) -> dict[str, Any]:
    """MFU and loader images/s per worker from a scripts/benchmark.py JSON, or the defaults."""
    rates: dict[str, Any] = {"mfu": DEFAULT_MFU, "mfu_source": f"default {DEFAULT_MFU} (assumed; pass --benchmark)",
                             "images_per_worker": DEFAULT_IMAGES_PER_WORKER,
                             "workers_source": f"default {DEFAULT_IMAGES_PER_WORKER:g} images/s per worker (assumed)"}
    if not path:
        return rates
    report = json.loads(Path(path).read_text())
    device = str(report.get("device", ""))
    if "achieved_tflops" in report and not device.startswith("cpu"):
        rates["mfu"] = report["achieved_tflops"] / peak_tflops
        rates["mfu_source"] = (f"{path}: {report['achieved_tflops']:.1f} TFLOP/s achieved on {device} at batch "
                               f"{report.get('batch_size')} / {peak_tflops:g} peak")
    elif "mfu_vs_measured_matmul" in report:
        rates["mfu"] = report["mfu_vs_measured_matmul"]
        rates["mfu_source"] = f"{path}: MFU vs the measured matmul rate on {device or 'its device'} (not a GPU figure)"
    rows = [r for r in report.get("data_pipeline", []) if r.get("decode") == "workers" and r.get("workers", 0) > 0]
    if rows:
        best = max(rows, key=lambda r: r["images_per_s_per_worker"])
        rates["images_per_worker"] = best["images_per_s_per_worker"]
        rates["workers_source"] = (f"{path}: {best['images_per_s_per_worker']:.1f} images/s per worker "
                                   f"({best['workers']} workers, {best.get('format', '')})")
    return rates


def train_samples(cfg, task: str, given: int | None) -> tuple[int | None, str]:
    if given:
        return given, "--samples"
    if cfg.data.format == "wds" and cfg.data.num_samples:
        return int(cfg.data.num_samples), "data.num_samples"
    try:
        count = sum(len(json.loads(Path(f).read_text())) for f in cfg.data.train_files)
        if count:
            return count, "counted in data.train_files"
    except (OSError, ValueError, TypeError):
        pass
    if task == "pretrain":
        return ALBEF_4M_PAIRS, "ALBEF-4M's 5.1M image-text pairs (data.train_files not readable here)"
    return None, "unknown: pass --samples"


# ----------------------------------------------------------------------------- the plan


def plan(cfg, task: str, gpu: GPU, gpus: int, benchmark: str | None = None, samples: int | None = None,
         search: bool = True, margins: Margins = Margins(), cache: dict | None = None) -> dict[str, Any]:
    """The plan of `task` at `cfg` on `gpus` x `gpu` (see the module docstring). `cache`: a dict
    kept between calls with the same cfg and task, so that several GPUs share the traces."""
    import torch

    from albef.engine.trainer import resolve_precision

    amp = resolve_precision(cfg.train.precision, torch.device("cuda"))  # the precision the GPU run takes
    compute_bytes = 2 if amp is not None else 4
    memory_bytes = gpu.memory_mib * MIB
    batch = cfg.train.batch_size
    strategy = cfg.train.strategy
    cache = {} if cache is None else cache
    traces: dict[tuple[bool, int], StepTrace] = cache.setdefault("traces", {})
    tracers: dict[bool, StepTracer] = cache.setdefault("tracers", {})

    def traced(ckpt: bool, b: int) -> StepTrace:
        if ckpt not in tracers:
            tracers[ckpt] = StepTracer(task, with_checkpointing(cfg, ckpt), amp)
        if (ckpt, b) not in traces:
            traces[ckpt, b] = tracers[ckpt].trace(b)
        return traces[ckpt, b]

    base = traced(False, batch)
    shapes = None
    if task in RETRIEVAL_EVAL_TASKS:
        from albef.flops import Shapes

        sh = Shapes.of(tracers[False].model)
        shapes = {"image_tokens": sh.image_tokens, "vision_width": sh.vision_width, "text_width": sh.text_width,
                  "embed_dim": sh.embed_dim}
    sizes, sizes_source = split_sizes(cfg)
    store = eval_token_store(task, shapes or {}, cfg, gpus, compute_bytes, sizes) if shapes else 0

    report: dict[str, Any] = {
        "task": task, "gpu": vars(gpu) | {"memory_gib": memory_bytes / GIB}, "gpus": gpus, "strategy": strategy,
        "precision": "bf16" if amp == torch.bfloat16 else "fp16" if amp == torch.float16 else "fp32",
        "batch_size": batch,
        "margins": {"fragmentation": margins.fragmentation, "cuda_context_gib": margins.context_gib,
                    "rule": "fits when (traced peak + estimates) x (1 + fragmentation) + CUDA context <= GPU memory"},
        "traced": ["weights", "momentum_weights", "gradients", "adamw_states", "queues", "activations (peak)"],
        "estimated": ["fragmentation", "CUDA context and kernel workspaces", "ddp_grad_buckets (N > 1)",
                      "fsdp_gathered_units and FSDP2 sharding (derived, not traced)",
                      "eval_token_store (sizes of the stored tensors)",
                      "activations on CUDA kernels (traced on the CPU's: SDPA/autocast may differ)"],
        "eval_token_store": {"bytes": store, "split": sizes_source},
        "memory": {},
    }
    for ckpt in (False, True):
        tr = traced(ckpt, batch)
        rows = {}
        for strat in ("ddp", "fsdp"):
            mem = per_gpu_memory(tr, strat, gpus, compute_bytes)
            training = sum(mem.values())
            rows[strat] = {"bytes": mem, "training_peak": training, "with_margin": with_margin(training, margins),
                           "fits": fits(training, memory_bytes, margins)}
        report["memory"]["checkpointing" if ckpt else "no_checkpointing"] = rows
    report["params"] = {"trainable": base.params // 4, "momentum": base.momentum_params // 4}

    if search:
        report["largest_batch"] = {}
        for ckpt in (False, True):
            half = max(1, batch // 2)  # two traces give the activations' slope per sample
            a, b2 = traced(ckpt, half), traced(ckpt, batch)
            per_sample = max(1, (b2.activations - a.activations) // max(1, batch - half)) if batch > half \
                else max(1, b2.activations)
            for strat in ("ddp", "fsdp"):
                if strat == "fsdp" and gpus == 1:
                    continue
                mem = per_gpu_memory(b2, strat, gpus, compute_bytes)
                room = (memory_bytes - margins.context_gib * GIB) / (1 + margins.fragmentation) - sum(mem.values())
                guess = max(1, int(batch + room // per_sample))

                def peak_at(b: int, ckpt=ckpt, strat=strat) -> int:
                    return sum(per_gpu_memory(traced(ckpt, b), strat, gpus, compute_bytes).values())

                found = largest_batch(peak_at, memory_bytes, guess, margins)
                report["largest_batch"][f"{strat}{'_checkpointing' if ckpt else ''}"] = found
        ddp = report["largest_batch"]["ddp"]
        report["needs_fsdp_above_batch"] = (
            None if strategy == "fsdp" else ddp if report["largest_batch"].get("fsdp", 0) > ddp else None)

    rates = benchmark_rates(benchmark, gpu.bf16_tflops)
    seconds = step_seconds(base.flops, gpu.bf16_tflops, rates["mfu"])
    pairs_per_s = batch * gpus / seconds
    total_samples, samples_source = train_samples(cfg, task, samples)
    timing: dict[str, Any] = {
        "flops_per_step": base.flops, "flops_source": base.flops_source, "peak_tflops": gpu.bf16_tflops,
        "mfu": rates["mfu"], "mfu_source": rates["mfu_source"], "step_s": seconds,
        "pairs_per_s": pairs_per_s, "samples_per_epoch": total_samples, "samples_source": samples_source,
        "workers_per_gpu": math.ceil(pairs_per_s / gpus / rates["images_per_worker"]),
        "workers_source": rates["workers_source"],
    }
    if total_samples:
        steps = total_samples // (batch * gpus * cfg.train.grad_accum)
        timing["epoch_s"] = steps * cfg.train.grad_accum * seconds
        timing["total_s"] = timing["epoch_s"] * cfg.train.epochs
        timing["epochs"] = cfg.train.epochs
    report["time"] = timing
    return report


# ----------------------------------------------------------------------------- output


def _gib(b: float) -> str:
    return f"{b / GIB:6.2f}" if _UNIT[0] == "GiB" else f"{b / MIB:6.1f}"


_UNIT = ["GiB"]  # the table's unit: MiB for small (test) models


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s < 2 * 86400 else f"{s / 86400:.1f} days"


def format_plan(r: dict[str, Any]) -> str:
    gpu = r["gpu"]
    lines = [f"albef plan: task {r['task']}, {r['gpus']} x {gpu['memory_gib']:.1f} GiB GPU "
             f"({gpu['bf16_tflops']:g} TFLOP/s bf16 peak), {r['precision']}, batch {r['batch_size']} per GPU, "
             f"{r['params']['trainable']:,} trainable + {r['params']['momentum']:,} momentum parameters"]
    cats = list(dict.fromkeys(k for mode in r["memory"].values() for s in mode.values() for k in s["bytes"]))
    cols = [(mode, s) for mode in ("no_checkpointing", "checkpointing") for s in ("ddp", "fsdp")]
    head = "".join(f"{s + (' +ckpt' if mode == 'checkpointing' else ''):>12}" for mode, s in cols)
    _UNIT[0] = "GiB" if r["memory"]["no_checkpointing"]["ddp"]["training_peak"] >= GIB else "MiB"
    lines.append(f"{_UNIT[0] + ' per GPU':<24}{head}")
    for cat in cats:
        lines.append(f"{cat:<24}" + "".join(f"{_gib(r['memory'][m][s]['bytes'].get(cat, 0)):>12}" for m, s in cols))
    lines.append(f"{'training peak':<24}" + "".join(f"{_gib(r['memory'][m][s]['training_peak']):>12}" for m, s in cols))
    lines.append(f"{'  with margin':<24}" + "".join(f"{_gib(r['memory'][m][s]['with_margin']):>12}" for m, s in cols))
    lines.append(f"{'  fits':<24}" + "".join(f"{('yes' if r['memory'][m][s]['fits'] else 'NO'):>12}" for m, s in cols))
    if r["eval_token_store"]["bytes"]:
        lines.append(f"{'eval token store':<24}{_gib(r['eval_token_store']['bytes']):>12}   ({r['eval_token_store']['split']})")
    m = r["margins"]
    lines.append(f"margin: +{100 * m['fragmentation']:.0f}% fragmentation, +{m['cuda_context_gib']:g} GiB CUDA context "
                 f"and workspaces; traced: weights, gradients, AdamW, queues, activations; FSDP2 derived (/{r['gpus']})")
    if "largest_batch" in r:
        lb = r["largest_batch"]
        parts = [f"{k.replace('_checkpointing', ' +ckpt')} {v}" for k, v in lb.items()]
        lines.append("largest batch per GPU: " + ", ".join(parts))
        if r.get("needs_fsdp_above_batch") is not None:
            lines.append(f"needs FSDP above batch {r['needs_fsdp_above_batch']} per GPU (without checkpointing)")
    t = r["time"]
    line = (f"time: {t['flops_per_step'] / 1e12:.2f} TFLOP/step ({t['flops_source']}), MFU {t['mfu']:.2f} "
            f"({t['mfu_source']}): {1000 * t['step_s']:.0f} ms/step, {t['pairs_per_s']:,.0f} pairs/s on {r['gpus']} GPUs")
    lines.append(line)
    if "epoch_s" in t:
        lines.append(f"epoch of {t['samples_per_epoch']:,} pairs ({t['samples_source']}): {_duration(t['epoch_s'])}; "
                     f"{t['epochs']} epochs: {_duration(t['total_s'])}")
    lines.append(f"data workers per GPU: {t['workers_per_gpu']} ({t['workers_source']})")
    lines.append("these are predictions (fake-tensor trace + FLOPs/peak/MFU), not measurements")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="albef plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--task", default="pretrain", choices=trainable_tasks(), help="the task whose model and step are planned")
    p.add_argument("--gpu", default="a100-40gb", choices=sorted(GPUS), help="the GPU (table in albef/plan.py)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) in the run")
    p.add_argument("--gpu-memory", type=float, default=None, help="override the GPU's memory (GiB)")
    p.add_argument("--gpu-tflops", type=float, default=None, help="override the GPU's dense bf16 peak (TFLOP/s)")
    p.add_argument("--context-gib", type=float, default=CUDA_CONTEXT_GIB,
                   help="GiB added for the CUDA context and kernel workspaces")
    p.add_argument("--fragmentation", type=float, default=FRAGMENTATION, help="fraction added to the traced peak")
    p.add_argument("--benchmark", default=None, help="a scripts/benchmark.py JSON: MFU and images/s per worker")
    p.add_argument("--samples", type=int, default=None, help="training samples per epoch (default: counted)")
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch search (traces a few batches)")
    p.add_argument("--json", default=None, help="also write the plan here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from albef.config import ConfigError

    args = build_parser().parse_intermixed_args(argv)
    gpu = GPUS[args.gpu]
    gpu = GPU(int(args.gpu_memory * 1024) if args.gpu_memory else gpu.memory_mib,
              args.gpu_tflops or gpu.bf16_tflops, gpu.note)
    if args.gpus < 1:
        sys.stderr.write("error: albef plan: --gpus must be at least 1\n")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = planning_config(args.config, args.overrides, Path(tmp) / "bert")
        except (ConfigError, ValueError, OSError) as err:
            sys.stderr.write(f"error: albef plan: {err}\n")
            return 2
        try:
            report = plan(cfg, args.task, gpu, args.gpus, args.benchmark, args.samples, search=not args.no_search,
                          margins=Margins(args.fragmentation, args.context_gib))
        except (ConfigError, ValueError, OSError) as err:  # e.g. sizes the task's model refuses
            sys.stderr.write(f"error: albef plan: {err}\n")
            return 2
    print(format_plan(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
