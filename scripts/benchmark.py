"""Throughput of ALBEF pretraining: the training step on synthetic tensors, and the data pipeline.

The step (forward, backward, AdamW + zero_grad, EMA, enqueue) of the model built from any config
runs on the device after warm-up; the script prints and writes as JSON: pairs/s, ms/step, peak
memory, analytic FLOPs (albef/flops.py), achieved TFLOP/s and MFU against a matmul rate it
measures itself (bf16 on GPU, fp32 on CPU), per-phase times (hooks on the encoders; a separate
run, since the hooks synchronise), and images/s per data worker on a demo corpus it writes
(JSON annotations and WebDataset shards; decode in the workers, or data.decode=device with the
device's own decode + augment rate). Weights are random and nothing is downloaded: the BERT
comes from a local config with bert-base's sizes and a generated vocabulary.

    python scripts/benchmark.py --smoke                          # tiny, CPU, seconds
    python scripts/benchmark.py train.precision=bf16             # configs/pretrain.yaml on the GPU
    python scripts/benchmark.py --max-batch model.vision.grad_checkpointing=true ...
    python scripts/benchmark.py --data-only --data-workers 1,2 --data-images 256   # the input pipeline only
    python scripts/benchmark.py --preset cpu --compare /path/to/other/tree --rounds 15

`--compare TREE` is an A/B run: two worker processes, one importing `albef` from this tree and one
from TREE, take turns (a few steps each, many rounds), so that machine drift hits both alike;
it reports the median ms/step of each, their ratio, and both per-phase tables.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 30522
PAD, CLS, SEP = 0, 101, 102  # bert-base-uncased ids, kept by the generated vocabulary
PRESETS = {
    "smoke": [
        "model.vision.image_size=32", "model.vision.patch_size=16", "model.vision.embed_dim=64",
        "model.vision.depth=2", "model.vision.num_heads=2", "model.embed_dim=32", "model.queue_size=64",
        "model.text.fusion_layer=1", "train.batch_size=4", "train.precision=fp32",
        "model.text.config_overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
        "intermediate_size: 128}",
    ],
    # The CPU config of the throughput issue: 15,053,885 trainable parameters.
    "cpu": [
        "model.vision.image_size=128", "model.vision.embed_dim=256", "model.vision.depth=4",
        "model.vision.num_heads=4", "model.embed_dim=128", "model.queue_size=1024",
        "model.text.fusion_layer=2", "train.batch_size=16", "data.max_tokens=25", "train.precision=fp32",
        "model.text.config_overrides={hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 4, "
        "intermediate_size: 1024, max_position_embeddings: 64}",
    ],
}
PHASES = ("vit", "vit_m", "text", "text_m", "fusion", "fusion_m", "multimodal", "multimodal_m",
          "mlm_head", "mlm_head_m", "forward_other", "backward", "optimizer", "ema", "queue")


def write_bert_dir(path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """A BERT dir (config.json + vocab.txt) with bert-base's shape and no weights."""
    from transformers import BertConfig

    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertConfig(vocab_size=vocab_size).save_pretrained(path)


def load_bench_config(config: str, overrides: list[str], bert_dir: str):
    from albef.config import load_config

    fixed = [f"model.text.bert={bert_dir}", "model.text.pretrained=false", "model.vision.pretrained=false",
             "model.vision.checkpoint=null"]
    return load_config(config, fixed + overrides)


def synthetic_batch(cfg, batch_size: int, device):
    """Images and captions of 8 to max_tokens tokens (the longest one full), padded, seeded."""
    import torch

    gen = torch.Generator().manual_seed(0)
    size, length = cfg.model.vision.image_size, cfg.data.max_tokens
    images = torch.randn(batch_size, 3, size, size, generator=gen)
    lengths = torch.randint(min(8, length), length + 1, (batch_size,), generator=gen)
    lengths[0] = length
    input_ids = torch.randint(1000, VOCAB_SIZE, (batch_size, length), generator=gen)
    positions = torch.arange(length)[None]
    input_ids[:, 0] = CLS
    input_ids[positions == lengths[:, None] - 1] = SEP
    input_ids[positions >= lengths[:, None]] = PAD
    attention_mask = (positions < lengths[:, None]).long()
    ids = torch.arange(batch_size)
    return [t.to(device) for t in (images, input_ids, attention_mask, ids)]


# ----------------------------------------------------------------------------- the step


class Bench:
    """A model, its optimizer and one synthetic batch; `step()` is one training step."""

    def __init__(self, cfg, batch_size: int, device):
        import torch

        from albef.engine.optim import build_optimizer
        from albef.engine.trainer import resolve_precision
        from albef.build import build_model

        self.torch, self.cfg, self.device = torch, cfg, device
        if device.type == "cuda":  # as the trainer does
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(0)
        self.model = build_model(cfg).to(device).train()
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.amp_dtype = resolve_precision(cfg.train.precision, device)
        self.batch = synthetic_batch(cfg, batch_size, device)
        self.masks = None  # the captions masked as the training collate does (no host sync in the step)
        if self.model.loss_weights["mlm"] and "mlm_masks" in inspect.signature(self.model.forward).parameters:
            from albef.data.masking import MLMMasking

            model = self.model
            masking = MLMMasking(model.mlm_probability, model.token_ids, model.text_encoder.config.vocab_size,
                                 model.mlm_mask_sep)
            masks = masking(self.batch[1].cpu(), list(range(batch_size)))
            self.masks = {k: v.to(device) for k, v in masks.items()}
        self.batch_size = batch_size
        self.params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def step(self, marks: list | None = None) -> None:
        """One step; with `marks`, the (synchronised) time after each part is appended."""
        torch, model = self.torch, self.model
        images, input_ids, attention_mask, ids = self.batch

        def mark():
            if marks is not None:
                self.sync()
                marks.append(time.perf_counter())

        mark()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            masks = {} if self.masks is None else {"mlm_masks": self.masks}  # (older trees under --compare: none)
            out = model(images, input_ids, attention_mask, alpha=self.cfg.loss.alpha, ids=ids, **masks)
        mark()
        out["loss"].backward()
        mark()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark()
        model.momentum_update()
        mark()
        model.enqueue(*out["queue_update"])
        mark()

    def time_steps(self, steps: int) -> list[float]:
        """Wall time (s) of each of `steps` steps."""
        times = []
        for _ in range(steps):
            self.sync()
            start = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - start)
        return times

    def phases(self, steps: int) -> dict[str, float]:
        """Median ms per phase over `steps` steps (encoder calls timed by forward hooks)."""
        model = self.model
        current: dict[str, float] = {}
        starts: dict[int, tuple[str, float]] = {}

        def watch(module, suffix, name=None):
            def pre(mod, args, kwargs):
                self.sync()
                label = name or kwargs.get("mode", "multimodal")
                starts[id(mod)] = (label + suffix, time.perf_counter())

            def post(mod, args, kwargs, output):
                self.sync()
                label, start = starts.pop(id(mod))
                current[label] = current.get(label, 0.0) + time.perf_counter() - start

            return [module.register_forward_pre_hook(pre, with_kwargs=True),
                    module.register_forward_hook(post, with_kwargs=True)]

        handles = []
        for suffix, vit, text in (("", model.visual_encoder, model.text_encoder),
                                  ("_m", model.visual_encoder_m, model.text_encoder_m)):
            handles += watch(vit, suffix, "vit") + watch(text.bert, suffix)
            handles += watch(text.cls.predictions, suffix, "mlm_head")
        rows = []
        try:
            for _ in range(steps):
                current.clear()
                marks: list[float] = []
                self.step(marks)
                forward, backward, optimizer, ema, queue = (b - a for a, b in zip(marks, marks[1:]))
                row = dict(current, backward=backward, optimizer=optimizer, ema=ema, queue=queue)
                row["forward_other"] = forward - sum(current.values())
                row["total"] = marks[-1] - marks[0]
                rows.append(row)
        finally:
            for handle in handles:
                handle.remove()
        keys = [k for k in (*PHASES, "total") if any(k in r for r in rows)]
        return {k: 1000 * statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def matmul_rate(device, dtype) -> float:
    """FLOP/s of a large square matmul on `device` (the achievable peak MFU is measured against)."""
    import torch

    n, reps = (8192, 20) if device.type == "cuda" else (1024, 10)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def masked_tokens(bench: Bench) -> int:
    """MLM positions per step (the expectation over the masking draws of this batch)."""
    from albef.data.masking import mask_tokens

    model, (_, input_ids, _, _) = bench.model, bench.batch
    torch = bench.torch
    counts = []
    for seed in range(20):
        torch.manual_seed(seed)
        labels = mask_tokens(input_ids, model.mlm_probability, model.token_ids, VOCAB_SIZE,
                             special=getattr(model, "never_masked", None))[1]
        counts.append(int((labels != -100).sum()))
    return round(statistics.mean(counts))


def count_flops(bench: Bench) -> int:
    """FLOPs of one step counted by torch's FlopCounterMode (matmul-type ops; CPU SDPA uncounted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        images, input_ids, attention_mask, ids = bench.batch
        with bench.torch.autocast(bench.device.type, dtype=bench.amp_dtype or bench.torch.float32,
                                  enabled=bench.amp_dtype is not None):
            out = bench.model(images, input_ids, attention_mask, alpha=0.4, ids=ids)
        out["loss"].backward()
    bench.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_report(cfg, batch_size: int, steps: int, warmup: int, phase_steps: int, device) -> dict:
    import torch

    from albef.flops import step_flops

    bench = Bench(cfg, batch_size, device)
    for _ in range(warmup):
        bench.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = bench.time_steps(steps)
    step_s = statistics.median(times)
    length = bench.batch[1].shape[1]
    flops = step_flops(bench.model, batch_size, length, masked_tokens(bench))
    dtype = bench.amp_dtype or torch.float32
    rate = matmul_rate(device, dtype)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "precision": str(dtype).replace("torch.", ""),
        "trainable_params": bench.params,
        "batch_size": batch_size, "image_size": cfg.model.vision.image_size, "text_length": length,
        "steps": steps, "ms_per_step": 1000 * step_s, "ms_per_step_mean": 1000 * statistics.mean(times),
        "pairs_per_s": batch_size / step_s,
        "analytic_gflop_per_step": flops["step"] / 1e9,
        "analytic_gflop_per_pair": flops["step"] / batch_size / 1e9,
        "achieved_tflops": flops["step"] / step_s / 1e12,
        "matmul_tflops": rate / 1e12,
        "mfu_vs_measured_matmul": flops["step"] / step_s / rate,
    }
    if device.type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if phase_steps:
        report["phases_ms"] = bench.phases(phase_steps)
    if device.type == "cpu" and batch_size * cfg.model.vision.image_size <= 4096:  # cheap enough to count
        report["counted_gflop_per_step"] = count_flops(bench) / 1e9
    return report


def largest_batch(cfg, device, start: int) -> dict:
    """The largest batch (doubling, then bisecting) whose step fits in device memory."""
    import torch

    def fits(batch_size: int) -> bool:
        try:
            bench = Bench(cfg, batch_size, device)
            for _ in range(2):
                bench.step()
            del bench
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    low, high = 0, start
    while fits(high):
        low, high = high, high * 2
    while high - low > 8:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return {"largest_batch": low, "first_failing_batch": high,
            "grad_checkpointing": {"vision": cfg.model.vision.grad_checkpointing,
                                   "text": cfg.model.text.grad_checkpointing}}


# ----------------------------------------------------------------------------- the data pipeline


def data_report(cfg, image_size: int, num_images: int, workers: list[int], batches: int, device) -> dict:
    """Images/s of the real training loader (read, decode, augment, tokenise, collate) on a demo
    corpus, for each worker count, both formats (JSON annotations, WebDataset shards) and both
    decode paths. With data.decode=device the workers only read bytes and check JPEG headers;
    the decode + augmentation of each batch then runs on `device` (timed apart, synchronised):
    ``images_per_s`` is the loader alone, ``device_images_per_s`` the device stage alone."""
    import torch

    from albef.config import load_config
    from albef.data.synthetic import generate_corpus
    from albef.dist import DistInfo
    from albef.engine.trainer import to_device
    from albef.tasks.pretrain import PretrainTask

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = []
    with tempfile.TemporaryDirectory() as out:
        corpus = generate_corpus(out, num_train=num_images, num_test=1, image_size=image_size,
                                 captions_per_image=1, shard_size=max(1, num_images // 4))
        for decode in ("workers", "device"):
            for fmt in ("json", "wds"):
                for num_workers in workers:
                    data_cfg = load_config(None, [
                        f"model.vision.image_size={cfg.model.vision.image_size}",
                        f"model.text.bert={corpus['bert']}", f"data.train_files=[{corpus['train']}]",
                        f"data.image_root={corpus['image_root']}", f"data.format={fmt}",
                        f"data.shards={corpus['shards']}", f"data.num_samples={num_images}",
                        f"data.num_workers={num_workers}", f"train.batch_size={cfg.train.batch_size}",
                        f"data.max_tokens={cfg.data.max_tokens}", f"data.decode={decode}",
                    ])
                    loader, _ = PretrainTask().build_train_loader(
                        data_cfg, DistInfo(0, 1, 0, torch.device("cpu")), 0, 0)
                    it = iter(loader)
                    first = next(it)  # workers started, first batch out
                    if decode == "device":
                        to_device(first, device)  # warm the decoder
                    start, images, kept = time.perf_counter(), 0, []
                    for _, batch in zip(range(batches), it):
                        images += len(batch["images"])
                        kept.append(batch)
                    elapsed = time.perf_counter() - start
                    del it, loader
                    row = {"decode": decode, "format": fmt, "workers": num_workers,
                           "images_per_s": images / elapsed,
                           "images_per_s_per_worker": images / elapsed / max(1, num_workers),
                           "source_image_px": image_size, "batches": batches}
                    if decode == "device":
                        sync()
                        start = time.perf_counter()
                        for batch in kept:
                            to_device(batch, device)
                        sync()
                        row["device_images_per_s"] = images / (time.perf_counter() - start)
                        row["device"] = str(device)
                    results.append(row)
    return {"data_pipeline": results}


# ----------------------------------------------------------------------------- A/B


def worker(args) -> None:
    """Serve `run N` / `phases N` requests on stdin with one JSON line each (A/B mode)."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as bert_dir:
        write_bert_dir(Path(bert_dir))
        cfg = load_bench_config(args.config, args.overrides, bert_dir)
        bench = Bench(cfg, cfg.train.batch_size, torch.device(args.device))
    for _ in range(args.warmup):
        bench.step()
    print(json.dumps({"ready": True, "params": bench.params}), flush=True)
    for line in sys.stdin:
        command, count = line.split()
        if command == "run":
            result = {"times": bench.time_steps(int(count))}
        else:
            result = {"phases": bench.phases(int(count))}
        print(json.dumps(result), flush=True)


def compare(args, overrides: list[str]) -> dict:
    """Alternate this tree and `args.compare` in two worker processes; medians and per-phase tables."""
    trees = {"this": REPO, "other": Path(args.compare).resolve()}
    procs = {}
    config = Path(args.config).resolve()
    for name, tree in trees.items():
        tree_config = tree / config.relative_to(REPO) if config.is_relative_to(REPO) else config
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", str(tree_config),
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--device", args.device, *overrides]
        procs[name] = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
        ready = json.loads(procs[name].stdout.readline())
        print(f"{name}: {tree} ({ready['params']:,} trainable parameters)", flush=True)

    def ask(name: str, request: str) -> dict:
        procs[name].stdin.write(request + "\n")
        procs[name].stdin.flush()
        return json.loads(procs[name].stdout.readline())

    times = {name: [] for name in trees}
    phases = {name: [] for name in trees}
    ratios = []
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        medians = {}
        for name in order:
            step_times = ask(name, f"run {args.steps}")["times"]
            times[name] += step_times
            medians[name] = statistics.median(step_times)
        ratios.append(medians["this"] / medians["other"])
        for name in order:
            phases[name].append(ask(name, f"phases {args.phase_steps}")["phases"])
        print(f"round {r + 1}/{args.rounds}: this {1000 * medians['this']:.1f} ms, "
              f"other {1000 * medians['other']:.1f} ms, ratio {ratios[-1]:.3f}", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    table = {name: {k: statistics.median(p[k] for p in rows if k in p)
                    for k in dict.fromkeys(k for p in rows for k in p)} for name, rows in phases.items()}
    return {
        "trees": {k: str(v) for k, v in trees.items()},
        "ms_per_step_median": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "ratio_of_medians": statistics.median(times["this"]) / statistics.median(times["other"]),
        "median_of_round_ratios": statistics.median(ratios),
        "round_ratios": ratios,
        "phases_ms": table,
    }


def print_phase_table(tables: dict[str, dict[str, float]]) -> None:
    names = list(tables)
    keys = [k for k in (*PHASES, "total") if any(k in t for t in tables.values())]
    print(f"{'phase (median ms)':<18}" + "".join(f"{n:>12}" for n in names))
    for key in keys:
        print(f"{key:<18}" + "".join(f"{tables[n].get(key, 0.0):>12.1f}" for n in names))


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain.yaml"))
    parser.add_argument("--preset", choices=sorted(PRESETS), help="overrides for a named size (before yours)")
    parser.add_argument("--smoke", action="store_true", help="--preset smoke, 3 steps, small data run")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (per round with --compare)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--phase-steps", type=int, default=5, help="steps of the per-phase run (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--no-data", action="store_true", help="skip the data pipeline timing")
    parser.add_argument("--data-only", action="store_true", help="only the data pipeline timing")
    parser.add_argument("--data-workers", default=None, help="comma-separated worker counts (default 0,1,2,4,8)")
    parser.add_argument("--data-images", type=int, default=512, help="demo corpus size for the data timing")
    parser.add_argument("--data-image-size", type=int, default=384, help="side of the demo JPEGs")
    parser.add_argument("--max-batch", action="store_true", help="find the largest batch that fits (GPU)")
    parser.add_argument("--compare", metavar="TREE", help="A/B against the albef package of another tree")
    parser.add_argument("--rounds", type=int, default=10, help="alternations with --compare")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = "smoke" if args.smoke else args.preset
    overrides = PRESETS.get(preset, []) + args.overrides
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    if args.compare:
        report = compare(args, overrides)
        print_phase_table(report["phases_ms"])
        print(f"median ms/step: this {report['ms_per_step_median']['this']:.1f}, "
              f"other {report['ms_per_step_median']['other']:.1f}; ratio {report['ratio_of_medians']:.3f} "
              f"(median of per-round ratios {report['median_of_round_ratios']:.3f})")
        return write_json(report, args.json)

    device = torch.device(args.device)
    steps, warmup = (3, 1) if args.smoke else (args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as bert_dir:
        write_bert_dir(Path(bert_dir))
        cfg = load_bench_config(args.config, overrides, bert_dir)
        if args.max_batch:
            report = largest_batch(cfg, device, args.batch_size or cfg.train.batch_size)
            print(json.dumps(report, indent=1))
            return write_json(report, args.json)
        report = {} if args.data_only else step_report(
            cfg, cfg.train.batch_size, steps, warmup, 2 if args.smoke else args.phase_steps, device)
    report["overrides"] = overrides
    if args.data_only:
        print_data_report(report, cfg, args, device)
        return write_json(report, args.json)
    print(f"{report['device']}, torch {report['torch']}, {report['precision']}: "
          f"{report['trainable_params']:,} trainable params, batch {report['batch_size']}, "
          f"{report['image_size']} px, {report['text_length']} tokens")
    memory = (f"peak GPU memory {report['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in report
              else f"peak RSS {report['peak_rss_gib']:.2f} GiB")
    print(f"{report['ms_per_step']:.1f} ms/step (median of {steps}), {report['pairs_per_s']:.1f} pairs/s, {memory}")
    print(f"{report['analytic_gflop_per_step']:.2f} GFLOP/step analytic "
          f"({report['analytic_gflop_per_pair']:.2f} per pair), {report['achieved_tflops']:.3f} TFLOP/s achieved, "
          f"matmul {report['matmul_tflops']:.3f} TFLOP/s measured, MFU {100 * report['mfu_vs_measured_matmul']:.1f}%")
    if "counted_gflop_per_step" in report:
        print(f"FlopCounterMode: {report['counted_gflop_per_step']:.2f} GFLOP/step (CPU SDPA uncounted)")
    if "phases_ms" in report:
        print_phase_table({"this": report["phases_ms"]})
    if not args.no_data:
        print_data_report(report, cfg, args, device)
    write_json(report, args.json)


def print_data_report(report: dict, cfg, args, device) -> None:
    """Run `data_report` with the command line's sizes, add it to `report` and print it."""
    workers = [int(w) for w in args.data_workers.split(",")] if args.data_workers else (
        [0, 1] if args.smoke else [0, 1, 2, 4, 8])
    report.update(data_report(cfg, 64 if args.smoke else args.data_image_size,
                              32 if args.smoke else args.data_images, workers, 4 if args.smoke else 20, device))
    for row in report["data_pipeline"]:
        line = (f"data decode={row['decode']:<7} {row['format']:>4}, {row['workers']} workers: "
                f"{row['images_per_s']:.1f} images/s ({row['images_per_s_per_worker']:.1f} per worker)")
        if "device_images_per_s" in row:
            line += f"; decode + augment on {row['device']}: {row['device_images_per_s']:.1f} images/s"
        print(line)


def write_json(report: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
