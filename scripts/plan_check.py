"""The planner's predicted peak (`albef plan`: one step traced on fake tensors) next to the
measured peak of the same step on real tensors.

    python scripts/plan_check.py --config configs/test_tiny.yaml model.text.bert=DIR   # CPU
    python scripts/plan_check.py --preset cpu                                         # benchmark's CPU config
    python scripts/plan_check.py train.batch_size=64 train.precision=bf16             # on a GPU: pretrain.yaml

The step is the planner's: AdamW states created first (a step on zero gradients), then forward
(autocast as train.precision), backward, AdamW step, zero_grad, after_optimizer_step.
Measured peak: on CUDA `torch.cuda.max_memory_allocated()` over the step; on the CPU the bytes
alive before the step (weights, momentum weights, buffers, AdamW states, the batch: exact sizes)
plus the highest running sum of the allocations and frees torch's profiler records during the
step (`profile_memory=True`: every allocation of torch's CPU allocator). Neither counts allocator
caching/fragmentation or the CUDA context: the planner's margins are for those.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))


def measured_peak(task_name: str, cfg, batch_size: int, device, amp_dtype) -> int:
    import torch

    from albef.engine.optim import build_optimizer
    from albef.plan import example_batch, make_task

    task = make_task(task_name)
    torch.manual_seed(0)
    model = task.build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg.optim, device)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch = example_batch(task_name, model, cfg, batch_size)
    batch = {k: (torch.randn(v) if isinstance(v, tuple) else v).to(device) for k, v in batch.items()}

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = task.forward_step(model, batch, 0.4)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_optimizer_step(model, [out])

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    tensors = [*model.parameters(), *model.buffers(), *(v for s in optimizer.state.values() for v in s.values()
                                                          if torch.is_tensor(v)), *(v for v in batch.values())]
    alive = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation (+bytes) and free (-bytes) of the step, in time order (kineto's raw events:
    # the op-level table attributes them to ops, counting nested ops twice)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = highest = 0
    for _, nbytes in events:
        running += nbytes
        highest = max(highest, running)
    return alive + highest


def main() -> int:
    import torch

    from albef.engine.trainer import resolve_precision
    from albef.plan import StepTracer, planning_config
    from benchmark import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain.yaml"))
    parser.add_argument("--task", default="pretrain")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="scripts/benchmark.py's overrides for a named size")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = PRESETS.get(args.preset, []) + args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        cfg = planning_config(args.config, overrides, Path(tmp) / "bert")
        amp = resolve_precision(cfg.train.precision, device)
        batch = cfg.train.batch_size
        predicted = StepTracer(args.task, cfg, amp).trace(batch)
        measured = measured_peak(args.task, cfg, batch, device, amp)
    report = {"config": args.config, "overrides": overrides, "task": args.task, "batch_size": batch,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "precision": str(amp or torch.float32).replace("torch.", ""),
              "measure": "torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "bytes alive before the step + peak running sum of torch.profiler [memory] events",
              "predicted_peak_mib": predicted.peak / 2**20, "measured_peak_mib": measured / 2**20,
              "predicted_over_measured": predicted.peak / measured}
    print(f"{report['task']} batch {batch} {report['precision']} on {report['device']}: predicted peak "
          f"{report['predicted_peak_mib']:.1f} MiB, measured {report['measured_peak_mib']:.1f} MiB "
          f"({report['measure']}); ratio {report['predicted_over_measured']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
