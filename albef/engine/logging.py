"""Rank-0 metrics: TensorBoard scalars, a JSON-lines file and a progress line with ETA.

Per-step values arrive as detached device tensors and are summed on the device; the host reads
them once per log window, so logging adds no synchronisation to ordinary steps.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter


class MetricLogger:
    """Window-averaged scalars written by the main process only (`enabled=False` elsewhere).

    When the fraction of a window spent waiting for data stays above `DATA_WAIT_LIMIT` for
    `DATA_WAIT_PATIENCE` windows in a row, a ``data_wait`` event says so (again every
    `DATA_WAIT_REPEAT` windows while it lasts): the input pipeline is the bottleneck.
    """

    DATA_WAIT_LIMIT = 0.1
    DATA_WAIT_PATIENCE = 3
    DATA_WAIT_REPEAT = 50

    def __init__(self, output_dir: str | Path, enabled: bool, log_every: int) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.log_every = max(1, log_every)
        self.total_steps: int | None = None
        self.writer: SummaryWriter | None = None
        self.jsonl = None
        self._slow_windows = 0  # consecutive windows above DATA_WAIT_LIMIT
        if enabled:
            output_dir = Path(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(output_dir / "tb"))
            self.jsonl = open(output_dir / "log.jsonl", "a", encoding="utf-8")
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._scalar_steps = 0
        self._images = 0
        self._data_wait = 0.0
        self._start = time.perf_counter()

    def update(self, scalars: dict[str, torch.Tensor], images: int, data_wait: float) -> None:
        """Add one optimizer step: its scalars (0-d tensors; empty for a skipped step), the
        images it trained on (all ranks) and the seconds it waited for data."""
        self._steps += 1
        self._images += images
        self._data_wait += data_wait
        if not self.enabled or not scalars:
            return
        self._scalar_steps += 1
        for name, value in scalars.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0

    def log(self, step: int, epoch: int, extra: dict[str, float]) -> dict[str, float]:
        """Write the window's averages plus `extra` (lr, alpha, counts...) and start a new window."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        record: dict[str, float] = {"step": step, "epoch": epoch}
        if self.enabled:
            names = sorted(self._sums)
            if names:
                means = (torch.stack([self._sums[n] for n in names]) / self._scalar_steps).tolist()
                record.update(zip(names, means))
            record.update(extra)
            record["images_per_s"] = self._images / elapsed
            record["data_wait_fraction"] = min(1.0, self._data_wait / elapsed)
            if torch.cuda.is_available():
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            self._write(record, elapsed)
            self._check_data_wait(step, record["data_wait_fraction"])
        self._reset_window()
        return record

    def _check_data_wait(self, step: int, fraction: float) -> None:
        """Warn when the step keeps waiting for data (see the class docstring)."""
        self._slow_windows = self._slow_windows + 1 if fraction > self.DATA_WAIT_LIMIT else 0
        late = self._slow_windows - self.DATA_WAIT_PATIENCE
        if late >= 0 and late % self.DATA_WAIT_REPEAT == 0:
            self.event(
                step, "data_wait", fraction=round(fraction, 3), windows=self._slow_windows,
                advice=f"the step waited for data more than {self.DATA_WAIT_LIMIT:.0%} of the time "
                       f"for {self._slow_windows} log windows: raise data.num_workers, or read pre-resized "
                       "WebDataset shards (scripts/make_shards.py, data.format: wds), or set data.jpeg_draft: true",
            )

    def _write(self, record: dict[str, float], elapsed: float) -> None:
        step = int(record["step"])
        for name, value in record.items():
            if name not in ("step", "epoch"):
                self.writer.add_scalar(f"train/{name}", value, step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        print(self._progress_line(record, elapsed), flush=True)

    def _progress_line(self, record: dict[str, float], elapsed: float) -> str:
        step = int(record["step"])
        total = self.total_steps or step
        line = f"epoch {int(record['epoch'])} step {step}/{total}"
        if "loss" in record:
            line += f" loss {record['loss']:.4f}"
        line += f" lr {record.get('lr', 0.0):.2e} {record['images_per_s']:.1f} img/s"
        if self._steps:
            eta = (total - step) * elapsed / self._steps
            line += f" eta {datetime.timedelta(seconds=int(eta))}"
        return line

    def results(self, step: int, split: str, result: dict[str, float]) -> Path | None:
        """Evaluation metrics: TensorBoard `{split}/*`, a line in log.jsonl and
        OUTPUT_DIR/results/{split}_step{step}.json (`{split}_latest.json` points at the newest)."""
        if not self.enabled:
            return None
        numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, value in numbers.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, "event": f"eval_{split}", **numbers}) + "\n")
        self.jsonl.flush()
        results_dir = self.output_dir / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{split}_step{step}.json"
        for target in (path, results_dir / f"{split}_latest.json"):
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=1, default=str))
            tmp.replace(target)
        return path

    def event(self, step: int, name: str, **fields: Any) -> None:
        """Record a one-off event (non-finite skip, preemption, bad-data report) and print it."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "event": name, **fields}) + "\n")
        self.jsonl.flush()
        details = " ".join(f"{k}={v}" for k, v in fields.items())
        print(f"[step {step}] {name}: {details}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
