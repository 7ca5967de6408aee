"""The one training loop, shared by pretraining and every later task.

A `Task` supplies the model, the data and a step function returning a dict of losses; `train`
does the rest: DDP wrapping, autocast, gradient accumulation, the momentum EMA (ALBEF's timing:
once per optimizer step, right before the first micro-batch's forward, the first step included),
clipping, non-finite skips, lr/alpha schedules, logging, checkpoints, exact resume and
preemption. Each step costs one host synchronisation: a small all_reduce(SUM) of
[non-finite flag per loss term, non-finite grad norm, preemption requested, the step's logged
scalars], so flags reach every rank and the logged loss terms are means over all ranks.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from albef.checkpoint import (CheckpointError, CheckpointWriter, LoadReport, best_checkpoint, checkpoint_dir, checkpoint_step,
                              is_dcp_checkpoint, load_checkpoint_file, load_pretrained, load_training_state,
                              confined, read_model_state, resolve_resume, save_pretrained)
from albef.config import Config, ConfigError, save_config
from albef.data.datasets import SkipCounter
from albef.data.device_decode import DeviceDecodeError, EncodedImages
from albef.dist import DistInfo, StopRequested, gather_objects, watch_stop
from albef.engine.fsdp import (clip_sharded_grads, gradient_sync, load_dcp_checkpoint, load_full_checkpoint,
                               replicated_params, save_dcp_checkpoint, shard_model, sync_replicated_grads)
from albef.engine.logging import MetricLogger
from albef.engine.optim import build_optimizer
from albef.engine.results import format_results, format_value, unit_of
from albef.engine.schedule import alpha_at, lr_at
from albef.models.albef import QUEUE_KEYS  # the ALBEF family's feature queues (training state)
from albef.models.momentum import MomentumModel

if TYPE_CHECKING:  # the contract (albef/tasks/base.py) sits above the engine
    from albef.tasks.base import Task

PREEMPTED_EXIT_CODE = 75  # exit status after SIGTERM/SIGUSR1: a checkpoint was saved, requeue me


class InitError(CheckpointError):
    """The `--init-from` weights do not fit the task's model (a user mistake: exit code 2)."""


class TrainingError(RuntimeError):
    """The run cannot continue (repeated non-finite losses, an empty epoch); str() is one line."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    consumed: int = 0  # global samples consumed in `epoch`
    nonfinite_steps: int = 0  # steps skipped for non-finite losses or gradients
    best_metric: float | None = None  # the task's best_metric on val so far (best.pt holds it)
    best_epoch: int | None = None
    evaluated_step: int | None = None  # step of the last val evaluation
    pending_eval: int | None = None  # epoch whose val evaluation a stop signal interrupted (run on resume)


# ----------------------------------------------------------------------------- small helpers


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.precision` ('auto': bf16 on CUDA, fp32 elsewhere); None = fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain data (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "rest": list(np_state[2:])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, *state["numpy"]["rest"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`; `EncodedImages` (data.decode=device) are decoded and
    augmented there."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) or isinstance(v, EncodedImages) else v
            for k, v in batch.items()}


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop checks it at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def check_same_resume_point(path: Path | None, world_size: int) -> None:
    """Each rank resolves --resume on its own (`auto` reads its own output_dir, which may be
    node-local): stop in one line unless every rank resumes the same step (a collective)."""
    if world_size == 1:
        return
    step = checkpoint_step(path) if path is not None else None
    point = "a fresh start" if path is None else f"step {step}" if step is not None else path.name
    points = gather_objects(point)
    if len(set(points)) > 1:
        ranks: dict[str, list[int]] = {}
        for rank, p in enumerate(points):
            ranks.setdefault(p, []).append(rank)
        views = "; ".join(f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {p}" for p, r in ranks.items())
        raise CheckpointError(f"ranks disagree on where to resume ({views}): every rank must see the same "
                              "checkpoints (a shared output_dir) or be given the same --resume PATH")


def data_layout(cfg: Config, dist: DistInfo) -> dict[str, int]:
    """What a WebDataset stream's position depends on; stored in every checkpoint."""
    return {"world_size": dist.world_size, "num_workers": cfg.data.num_workers}


def check_data_layout(saved: dict[str, int] | None, cfg: Config, dist: DistInfo, consumed: int) -> None:
    """A WebDataset stream resumed mid-epoch can only be positioned at the world size and worker
    count that consumed it; raise ConfigError (one line) otherwise."""
    if cfg.data.format != "wds" or not consumed or not saved:
        return
    now = data_layout(cfg, dist)
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(
            f"data.format=wds: this checkpoint is {consumed} samples into an epoch, read at another layout "
            f"({', '.join(changed)}); a shard stream cannot be repositioned: resume with the same number of "
            "processes and data.num_workers, or from a checkpoint at an epoch end")


# ----------------------------------------------------------------------------- the trainer


def _remaining_steps(loader: Any, accum: int, fallback: int) -> int:
    """Optimizer steps left in the epoch: a map-style loader positioned after the samples already
    consumed knows its length (also when the world size or batch size changed since they were
    consumed); a stream does not, and resumes at the same world size (`fallback`)."""
    try:
        return len(loader) // accum
    except TypeError:
        return fallback


class Trainer:
    """Holds the objects of one run; `fit()` is the loop."""

    def __init__(self, cfg: Config, task: Task, dist: DistInfo, resume: str | None = None,
                 init_from: str | None = None) -> None:
        if cfg.train.strategy == "fsdp" and resolve_precision(cfg.train.precision, dist.device) == torch.float16:
            raise ConfigError("train.precision: 'fp16' is not supported with train.strategy: 'fsdp' (the loss "
                              "scaler does not handle sharded gradients); use bf16 or fp32")
        if cfg.train.strategy == "fsdp" and dist.world_size > 1 and has_evaluation(task, cfg):
            raise ConfigError("train.strategy: 'fsdp' does not run the per-epoch evaluation of eval.val_files; "
                              "fine-tune with train.strategy=ddp or set eval.val_files=[]")
        self.cfg, self.task, self.dist = cfg, task, dist
        # Listen for preemption from the start: a notice that arrives while the model, data or
        # checkpoint are loading is honoured at the first step boundary.
        self.preemption = PreemptionFlag()
        self.preemption.install()
        self.device = dist.device
        self.is_main = dist.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = checkpoint_dir(self.output_dir)
        if self.is_main:
            save_config(cfg, str(self.output_dir / "config.yaml"))

        self.amp_dtype = resolve_precision(cfg.train.precision, self.device)
        if self.device.type == "cuda":  # fp32 matmuls (fp32 runs, fp32 parts of bf16 runs) may use TF32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.seed)  # identical initial weights and queues on every rank
        self.model = task.build_model(cfg)
        resume_path = resolve_resume(resume, cfg.output_dir) if resume else None
        check_same_resume_point(resume_path, dist.world_size)  # every rank, before any weights load
        init_from = init_from or cfg.model.init_checkpoint
        if resume_path is None and init_from:  # a resumable checkpoint of this run takes precedence
            init_weights(task, self.model, init_from, cfg)
        self.model.to(self.device)
        self.sharded = cfg.train.strategy == "fsdp" and dist.world_size > 1  # one rank: nothing to shard
        if self.sharded:
            shard_model(self.model, self.device, self.amp_dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.replicated = replicated_params(self.model) if self.sharded else []
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.state = TrainState()
        self.skips = SkipCounter()  # this rank's bad samples (rank 0 also holds those resumed)
        self.consecutive_nonfinite = 0

        checkpoint = self._load(resume_path)
        self.ddp_model = self.model
        if dist.world_size > 1 and not self.sharded:
            self.ddp_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # the model keeps its queues identical across ranks
                find_unused_parameters=task.find_unused_parameters(cfg),
            )
        rng = checkpoint and checkpoint["rng"]
        if rng and len(rng) == dist.world_size:
            set_rng_state(rng[dist.rank])
        else:
            seed_everything(cfg.seed + dist.rank + self.state.step)
        self.logger = MetricLogger(self.output_dir, enabled=self.is_main, log_every=cfg.train.log_every)
        self.checkpoints = CheckpointWriter(background=cfg.train.async_checkpoint)

    def _load(self, path: Path | None) -> dict[str, Any] | None:
        if path is None:
            return None
        if is_dcp_checkpoint(path):  # any strategy and world size: DCP reshards
            checkpoint = load_dcp_checkpoint(path, self.model, self.optimizer)
        elif self.sharded:
            checkpoint = load_checkpoint_file(path)
            load_full_checkpoint(checkpoint, self.model, self.optimizer)
        else:
            checkpoint = load_checkpoint_file(path)
            load_training_state(self.model, checkpoint["model"], path)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["train_state"])
        check_data_layout(checkpoint.get("data_layout"), self.cfg, self.dist, self.state.consumed)
        if self.is_main:  # run totals live on rank 0; the other ranks count from zero
            self.skips.load_state_dict(checkpoint["skips"])
            print(f"resumed from {path} (epoch {self.state.epoch}, step {self.state.step})", flush=True)
        return checkpoint

    # ------------------------------------------------------------------------- loop

    def fit(self) -> int:
        """Train to the end (or train.max_steps); returns 0, or PREEMPTED_EXIT_CODE."""
        cfg, accum = self.cfg.train, self.cfg.train.grad_accum
        samples_per_step = cfg.batch_size * self.dist.world_size * accum
        self.ddp_model.train()
        watch_stop(lambda: self.preemption.requested)  # evaluations check it between batches
        try:
            if self.state.pending_eval is not None:  # interrupted by a stop signal: evaluate again first
                try:
                    self.evaluate_and_keep_best(self.state.pending_eval)
                except StopRequested:
                    return self._preempted()
                self.state.pending_eval = None
                self.save()  # the same step, now recording its evaluation
            while self.state.epoch < cfg.epochs:
                if cfg.max_steps is not None and self.state.step >= cfg.max_steps:
                    break  # resumed at the end (e.g. preempted during the last evaluation)
                epoch = self.state.epoch
                loader, batches_per_epoch = self.task.build_train_loader(
                    self.cfg, self.dist, epoch, self.state.consumed)
                steps_per_epoch = batches_per_epoch // accum
                if steps_per_epoch == 0:
                    raise TrainingError(
                        f"epoch {epoch} has {batches_per_epoch} batches per rank, fewer than "
                        f"train.grad_accum={accum}: add data or lower train.batch_size")
                self.logger.total_steps = self._total_steps(steps_per_epoch)
                first = self.state.consumed // samples_per_step
                remaining = _remaining_steps(loader, accum, steps_per_epoch - first)
                if remaining <= 0:  # resumed with less than one step of this epoch left
                    self.state.epoch, self.state.consumed = epoch + 1, 0
                    continue
                batches = iter(loader)
                for i in range(remaining):
                    preempted = self.train_step(batches, epoch, first + i, steps_per_epoch)
                    self.state.consumed += samples_per_step
                    end_of_epoch = i + 1 == remaining
                    if end_of_epoch:
                        self.state.epoch, self.state.consumed = epoch + 1, 0
                    finished = cfg.max_steps is not None and self.state.step >= cfg.max_steps
                    if (end_of_epoch or finished) and not preempted:
                        rng = rng_state()  # evaluation draws from it (DataLoader seeds)
                        try:
                            self.evaluate_and_keep_best(epoch)  # before the checkpoint, which records it
                        except StopRequested:  # abandoned between batches: --resume runs it again,
                            set_rng_state(rng)  # from the RNG state it started with, as here
                            self.state.pending_eval, preempted = epoch, True
                    if preempted or finished or end_of_epoch or self.state.step % cfg.ckpt_every == 0:
                        self.save()
                    if end_of_epoch:
                        self._check_bad_samples(epoch)
                    if preempted:
                        return self._preempted()
                    if finished:
                        break
                del batches
                if cfg.max_steps is not None and self.state.step >= cfg.max_steps:
                    break
            self.checkpoints.wait()
            try:
                self.test_best()
            except StopRequested:  # the last checkpoint is written: --resume evaluates test again
                return self._preempted()
            return 0
        finally:
            watch_stop(None)
            error = self.checkpoints.close()  # an error stopped the run with a write in flight
            if error is not None:
                print(f"the last checkpoint was not written: {error}", file=sys.stderr, flush=True)
            self.preemption.restore()
            self.logger.close()

    def _preempted(self) -> int:
        """Exit after a stop signal: the checkpoint is on disk before the process exits."""
        self.checkpoints.wait()
        self.logger.event(self.state.step, "preempted", exit_code=PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE

    def train_step(self, batches: Any, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> bool:
        """One optimizer step over train.grad_accum micro-batches; returns 'preemption requested'."""
        cfg = self.cfg
        accum = cfg.train.grad_accum
        lr = lr_at(self.state.step, epoch, cfg.optim, cfg.train.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        alpha = alpha_at(epoch, step_in_epoch, steps_per_epoch, cfg.loss.alpha, cfg.loss.alpha_warmup) \
            if cfg.model.distill else 0.0

        outputs, images, data_wait = [], 0, 0.0
        momentum_due = True
        for i in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - start
            self.skips.update(batch)
            if len(batch["images"]) == 0:  # every sample of the micro-batch was unusable
                if self.dist.world_size > 1:
                    raise TrainingError(
                        f"a whole batch of {cfg.train.batch_size} samples was unusable on rank "
                        f"{self.dist.rank} (see the warnings above): fix or remove the bad files")
                continue
            try:
                batch = to_device(batch, self.device)
            except DeviceDecodeError as exn:  # data.decode=device: a file that fooled the header check
                raise TrainingError(str(exn)) from None
            images += len(batch["images"])
            if momentum_due:  # ALBEF: the EMA, then the momentum forward (once per optimizer step)
                update_momentum(self.model)
                momentum_due = False
            last = i == accum - 1
            with self._no_sync() if self.dist.world_size > 1 and not last else nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out = self.task.forward_step(self.ddp_model, batch, alpha)
                loss = out["loss"] / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            outputs.append(out)
        if self.replicated:
            sync_replicated_grads(self.replicated)

        if self.scaler is not None and outputs:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        terms = sorted(k for k, v in (outputs[0] if outputs else {}).items() if k.startswith("loss"))
        local = {k: sum(o[k].detach().float() for o in outputs) / len(outputs) for k, v in outputs[0].items()
                 if torch.is_tensor(v) and v.ndim == 0} if outputs else {}
        bad_terms, bad_grad, preempted, means = self._agree(outputs, terms, grad_norm, local)

        scalars: dict[str, torch.Tensor] = {}
        if bad_terms or bad_grad:
            self._skip_step(bad_terms, overflow=self.scaler is not None and not bad_terms)
        elif not outputs:  # nothing usable to learn from
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.task.after_optimizer_step(self.model, outputs)
            self.consecutive_nonfinite = 0
            scalars = {**means, "grad_norm": grad_norm}
        self.logger.update(scalars, images * self.dist.world_size, data_wait)
        self.state.step += 1

        if self.logger.should_log(self.state.step):
            skipped = sum(self.skips.all_reduce().counts.values())
            self.logger.log(self.state.step, epoch, {
                "lr": lr, "alpha": alpha, "skipped_steps": self.state.nonfinite_steps,
                "skipped_samples": skipped,
            })
        return preempted

    def _no_sync(self) -> Any:
        """Skip the gradient reduction of a non-final micro-batch."""
        return gradient_sync(self.model, False) if self.sharded else self.ddp_model.no_sync()

    def _grad_norm(self) -> torch.Tensor:
        if self.sharded:
            return clip_sharded_grads(self.params, self.cfg.train.clip_grad, self.device)
        if self.cfg.train.clip_grad is not None:
            return nn.utils.clip_grad_norm_(self.params, self.cfg.train.clip_grad)
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def _agree(self, outputs: list[dict[str, Any]], terms: list[str], grad_norm: torch.Tensor,
               local: dict[str, torch.Tensor]) -> tuple[list[str], bool, bool, dict[str, torch.Tensor]]:
        """The step's single sync: every rank learns (non-finite terms, non-finite grads, preempt)
        and the means over ranks of this step's `local` scalars (rank means of its micro-batches;
        every rank has the same names). Flags are 0/1 and summed: a sum > 0 means some rank set it."""
        flags = [~torch.isfinite(sum(o[k].detach().float() for o in outputs)) for k in terms]
        flags.append(~torch.isfinite(grad_norm.float()))
        flags.append(torch.tensor(self.preemption.requested, device=self.device))
        names = sorted(local)
        packed = torch.cat([torch.stack(flags).float(), torch.stack([local[n] for n in names]).float()
                            if names else torch.zeros(0, device=self.device)])
        if self.dist.world_size > 1:
            torch_dist.all_reduce(packed, op=torch_dist.ReduceOp.SUM)
        values = packed[:len(flags)].tolist()
        means = dict(zip(names, (packed[len(flags):] / self.dist.world_size).unbind()))
        bad_terms = [k for k, bad in zip(terms, values) if bad]
        return bad_terms, bool(values[-2]), bool(values[-1]), means

    def _skip_step(self, bad_terms: list[str], overflow: bool) -> None:
        """Drop this step's gradients; the queues stay untouched (the step's EMA, which ran before
        its forward, moved the momentum copies towards unchanged online weights).

        fp16 overflows (finite losses, infinite scaled grads) only lower the loss scale; every
        other non-finite step counts towards train.max_nonfinite consecutive skips.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        if overflow:
            return
        named = [t for t in bad_terms if t != "loss"] or bad_terms or ["grad_norm"]
        self.state.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        self.logger.event(self.state.step + 1, "nonfinite_skip", terms=",".join(named),
                          consecutive=self.consecutive_nonfinite)
        if self.consecutive_nonfinite >= self.cfg.train.max_nonfinite:
            raise TrainingError(
                f"non-finite {' and '.join(named)} for {self.consecutive_nonfinite} consecutive steps "
                f"(train.max_nonfinite={self.cfg.train.max_nonfinite}) at step {self.state.step + 1}; "
                f"the last good checkpoint is in {self.ckpt_dir}: lower optim.lr or set train.clip_grad")

    def _total_steps(self, steps_per_epoch: int) -> int:
        total = steps_per_epoch * self.cfg.train.epochs
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    # ------------------------------------------------------------------------- bad data, checkpoints

    def _check_bad_samples(self, epoch: int) -> None:
        """Report the bad samples so far; stop (after the epoch's checkpoint) when they exceed
        data.max_bad_fraction."""
        skips = self.skips.all_reduce()
        if skips.counts:
            self.logger.event(self.state.step, "bad_samples", epoch=epoch, report=skips.report())
        skips.check(self.cfg.data.max_bad_fraction)

    # ------------------------------------------------------------------------- evaluation

    @property
    def best_path(self) -> Path:
        return best_checkpoint(self.output_dir)

    def evaluate_and_keep_best(self, epoch: int) -> dict[str, float] | None:
        """Evaluate on val (every rank takes part); rank 0 logs the metrics and, when the task's
        best_metric improved, writes best.pt (weights + config) atomically. Recorded in the
        train state, so a resumed run neither repeats it nor forgets the best value."""
        if not has_evaluation(self.task, self.cfg, "val") or self.state.evaluated_step == self.state.step:
            return None
        result = run_evaluation(self.task, self.model, self.cfg, self.dist, "val")
        self.state.evaluated_step = self.state.step
        key = self.task.best_metric
        value = result.get(key) if key else None
        improved = value is not None and (self.state.best_metric is None or value > self.state.best_metric)
        if improved:
            self.state.best_metric, self.state.best_epoch = float(value), epoch
            if self.is_main:
                save_pretrained(self.model, self.best_path, self.cfg.to_dict())
        if self.is_main:
            self.logger.results(self.state.step, "val", {**result, "epoch": epoch})
            if improved:
                unit = "%" if unit_of(key) == "%" else ""
                print(f"new best {key} {format_value(key, value)}{unit} (epoch {epoch}): wrote {self.best_path}",
                      flush=True)
        return result

    def test_best(self) -> dict[str, float] | None:
        """At the end of training: evaluate best.pt (or the final weights) on test."""
        if not has_evaluation(self.task, self.cfg, "test"):
            return None
        if self.best_path.is_file():
            load_pretrained(self.model, confined(self.best_path, self.output_dir))
        result = run_evaluation(self.task, self.model, self.cfg, self.dist, "test")
        if self.is_main:
            self.logger.results(self.state.step, "test", result)
        return result

    def save(self) -> Path | None:
        """Checkpoint written by rank 0 (FSDP: a .dcp directory written by every rank); every
        rank contributes its RNG state and waits for it. With train.async_checkpoint rank 0 only
        copies the state to CPU before the ranks go on; the file is written in the background
        (`CheckpointWriter`: one write in flight, finished before the run ends or exits)."""
        skips = self.skips.all_reduce()
        rngs = gather_objects(rng_state())
        state = {
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "train_state": vars(self.state).copy(),
            "skips": skips.state_dict(),
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "data_layout": data_layout(self.cfg, self.dist),
        }
        if self.cfg.train.strategy == "fsdp":
            return save_dcp_checkpoint(self.model, self.optimizer, state, self.ckpt_dir, self.state.step,
                                       self.cfg.train.keep_last)
        path = None
        if self.is_main:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
            path = self.checkpoints.save(state, self.ckpt_dir, self.state.step, self.cfg.train.keep_last)
        if self.dist.world_size > 1:
            torch_dist.barrier()
        return path


def update_momentum(model: nn.Module) -> None:
    """The momentum EMA of `model` (unwrapped) if it has momentum copies (a `MomentumModel`).
    The engine runs it once per optimizer step, before that step's first forward: ALBEF's
    `_momentum_update()` at the top of its forward, so a model whose momentum copies differ from
    its online weights (a loaded checkpoint) sees the updated copies from its first step on."""
    if isinstance(model, MomentumModel):
        model.momentum_update()


def train(cfg: Config, task: Task, dist: DistInfo, resume: str | None = None, init_from: str | None = None) -> int:
    """Build a Trainer and run it; returns the process exit code (0 or PREEMPTED_EXIT_CODE)."""
    return Trainer(cfg, task, dist, resume, init_from).fit()


# ----------------------------------------------------------------------------- fine-tuning hooks


def init_weights(task: Task, model: nn.Module, path: str | Path, cfg: Config) -> LoadReport:
    """`--init-from`: read any accepted weight file, let the task map it onto its model (or load
    it as it is), print the report. `model.init_queues: fresh` leaves the feature queues at
    their initial state instead of taking the checkpoint's. A file or folder that cannot be read
    (refused, damaged, not on the Hub) is a user mistake too: InitError."""
    try:  # a file that cannot be read, is refused or does not fit: the same InitError (exit 2)
        state = read_model_state(path)
    except CheckpointError as err:
        raise InitError(str(err)) from err
    if cfg.model.init_queues == "fresh":
        state = {k: v for k, v in state.items() if k not in QUEUE_KEYS}
    try:
        report = task.init_weights(model, state, str(path))
    except CheckpointError as err:
        raise InitError(str(err)) from err
    report.print()
    return report


def has_evaluation(task: Task, cfg: Config, split: str | None = None) -> bool:
    """Whether the task evaluates and the config names files for `split` (any split: None)."""
    if not task.evaluates():
        return False
    files = {"val": cfg.eval.val_files, "test": cfg.eval.test_files}
    return bool(files[split]) if split else any(files.values())


def run_evaluation(task: Task, model: nn.Module, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
    """`task.evaluate` on `split` in eval mode (training mode restored), printed on rank 0 and
    written to OUTPUT_DIR/results/{split}_step{N}.json by the caller's logger."""
    was_training = model.training
    model.eval()
    try:
        result = task.evaluate(model, cfg, dist, split)
    finally:
        model.train(was_training)
    if dist.rank == 0:
        print(format_results(split, result, task.format_result), flush=True)
    return result


def evaluate_only(cfg: Config, task: Task, dist: DistInfo, weights: str | Path | None) -> dict[str, dict[str, float]]:
    """`--evaluate`: the task's model from `weights` (mapped as `--init-from` does), evaluated on
    val and test (those with files); results written to OUTPUT_DIR/results/ and returned."""
    seed_everything(cfg.seed)
    model = task.build_model(cfg)
    if weights is not None:
        init_weights(task, model, weights, cfg)
    model.to(dist.device)
    logger = MetricLogger(Path(cfg.output_dir), enabled=dist.rank == 0, log_every=1)
    results = {}
    try:
        for split in ("val", "test"):
            if has_evaluation(task, cfg, split):
                results[split] = run_evaluation(task, model, cfg, dist, split)
                logger.results(0, split, results[split])
    finally:
        logger.close()
    return results
