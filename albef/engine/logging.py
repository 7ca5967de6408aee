"""Rank-0 metrics: TensorBoard scalars, a JSON-lines file and a progress line with ETA.

Per-step values arrive as detached device tensors and are summed on the device; the host reads
them once per log window, so logging adds no synchronisation to ordinary steps.

ETAs come from smoothed rates, never from the last few steps alone: the training line from an
exponential average of the step time (`StepTimeAverage`, horizon `ETA_HORIZON_STEPS`), the
evaluation progress (`progress`) from the average rate since the bar started. When stderr is
not a terminal, progress is written as periodic plain lines (no carriage returns), so a log
file stays readable.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
from torch.utils.tensorboard import SummaryWriter

from albef.engine.results import numbers, results_record


ETA_HORIZON_STEPS = 50


class StepTimeAverage:
    """Exponential moving average of the seconds per optimizer step with a horizon of `horizon`
    steps: a log window of n steps taking s seconds moves the average towards s / n with weight
    1 - (1 - 1/horizon)**n (the first window sets it). After the speed changes, the old speed's
    weight falls to e**-1 within `horizon` steps and below 5% within 3 horizons, so the ETA
    follows a machine whose load changes without swinging with every window.
    """

    def __init__(self, horizon: int = ETA_HORIZON_STEPS) -> None:
        self.horizon = max(1, horizon)
        self.seconds_per_step: float | None = None

    def update(self, steps: int, seconds: float) -> None:
        if steps <= 0:
            return
        window = seconds / steps
        if self.seconds_per_step is None:
            self.seconds_per_step = window
        else:
            weight = 1.0 - (1.0 - 1.0 / self.horizon) ** steps
            self.seconds_per_step += weight * (window - self.seconds_per_step)

    def eta(self, remaining_steps: int) -> float | None:
        """Seconds left for `remaining_steps` at the averaged speed (None before any window)."""
        if self.seconds_per_step is None:
            return None
        return max(0, remaining_steps) * self.seconds_per_step


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class MetricLogger:
    """Window-averaged scalars written by the main process only (`enabled=False` elsewhere).

    When the fraction of a window spent waiting for data stays above `DATA_WAIT_LIMIT` for
    `DATA_WAIT_PATIENCE` windows in a row, a ``data_wait`` event says so (again every
    `DATA_WAIT_REPEAT` windows while it lasts): the input pipeline is the bottleneck.
    """

    DATA_WAIT_LIMIT = 0.1
    DATA_WAIT_PATIENCE = 3
    DATA_WAIT_REPEAT = 50

    def __init__(self, output_dir: str | Path, enabled: bool, log_every: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.enabled = enabled
        self.clock = clock
        self.step_time = StepTimeAverage()
        self.eta_s: float | None = None  # the last progress line's ETA
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
        self._start = self.clock()

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
        elapsed = max(self.clock() - self._start, 1e-9)
        self.step_time.update(self._steps, elapsed)
        self.eta_s = self.step_time.eta((self.total_steps or step) - step)
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
        if self.eta_s is not None:
            line += f" eta {format_duration(self.eta_s)}"
        return line

    def results(self, step: int, split: str, result: dict[str, float]) -> Path | None:
        """Evaluation metrics in the one results format (albef/engine/results.py): TensorBoard
        `{split}/*`, a line in log.jsonl and OUTPUT_DIR/results/{split}_step{step}.json
        (`{split}_latest.json` points at the newest), the same numbers in each."""
        if not self.enabled:
            return None
        values = numbers(result)
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, "event": f"eval_{split}", **values}) + "\n")
        self.jsonl.flush()
        results_dir = self.output_dir / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{split}_step{step}.json"
        for target in (path, results_dir / f"{split}_latest.json"):
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results_record(result), indent=1, default=str))
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


# ----------------------------------------------------------------------------- progress


class LineProgress:
    """Progress for a stream that is not a terminal: one plain line every `interval` seconds
    (`desc: n/total unit (p%), r unit/s, eta H:MM:SS`, the rate averaged since the start) and a
    last line when it closes; never a carriage return. The same `update` / context-manager use
    as a tqdm bar."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.interval, self.clock = interval, clock
        self.n = 0
        self.start = self.last = clock()

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        line = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100.0 * self.n / max(self.total, 1):.0f}%)"
        line += f", {rate:.1f} {self.unit}/s"
        if self.n < self.total and rate > 0:
            line += f", eta {format_duration((self.total - self.n) / rate)}"
        else:
            line += f", {format_duration(elapsed)}"
        return line

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write(self._line(self.clock()) + "\n")
            self.stream.flush()
            self.stream = None

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True, stream: TextIO | None = None,
             interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
    """A progress display with ETA on `stream` (stderr): a tqdm bar on a terminal, `LineProgress`
    lines otherwise; nothing when not `enabled` or for empty work."""
    stream = stream if stream is not None else sys.stderr
    if not enabled or total == 0:
        return _NoProgress()
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True,
                    mininterval=0.5)
    return LineProgress(total, desc, unit, stream, interval, clock)
