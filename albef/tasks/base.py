"""`Task`: what a task gives the engine, with a default for every optional hook; `register_task`.

    @register_task("ve", help="SNLI-VE visual entailment fine-tuning and evaluation")
    class VETask(Task):
        ...

A task must supply `build_model`, `build_train_loader` and `forward_step` (an evaluation-only
task raises in the last two); everything else has a default here. A task that owns a config
section names it (`config_section`, `config_class`, `config_ranges`): `cfg.<section>` then
exists, loads from YAML and is validated like the built-in sections. See docs/DESIGN.md,
"Adding a task".
"""
from __future__ import annotations

import sys
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from torch import nn

from albef.models.albef import ALBEF_ADAPTER
from albef.cli import run_task
from albef.config import Config, describe_fields
from albef.dist import DistInfo
from albef.registry import register_task, tasks
from albef.weights import LoadReport, WeightAdapter

__all__ = ["Task", "register_task"]


class Task:
    """Supplies the engine (albef/engine/trainer.py) with a model, data, a step and evaluation."""

    # key of `evaluate`'s result that selects best.pt (higher is better); None: no best.pt
    best_metric: ClassVar[str | None] = None
    # the task's own `--flag VALUE` options, each setting one config key (see albef/cli.py)
    flags: ClassVar[Mapping[str, tuple[str, str]]] = {}
    description: ClassVar[str] = ""  # the --help description
    # the config section this task owns (None: it reads the shared sections only)
    config_section: ClassVar[str | None] = None
    config_class: ClassVar[type | None] = None
    config_ranges: ClassVar[Mapping[str, str]] = {}  # {"k_test": "[1, inf)"}, as config.py's ranges
    # how `--init-from` files map onto the model: the adapter of its model family (beside the model)
    weight_adapter: ClassVar[WeightAdapter] = ALBEF_ADAPTER

    # ------------------------------------------------------------------ required

    def build_model(self, cfg: Config) -> nn.Module:
        """The model, on the CPU, with every rank building identical weights from the same seed."""
        raise NotImplementedError(f"{type(self).__name__}.build_model")

    def build_train_loader(
        self, cfg: Config, dist: DistInfo, epoch: int, consumed: int
    ) -> tuple[Iterable[dict[str, Any]], int]:
        """(loader over the rest of `epoch` after `consumed` global samples, micro-batches per
        rank in a full epoch)."""
        raise NotImplementedError(f"{type(self).__name__} does not train (build_train_loader)")

    def forward_step(self, model: nn.Module, batch: dict[str, Any], alpha: float) -> dict[str, Any]:
        """Losses for one micro-batch: 'loss' (to backprop), 'loss_*' terms and other 0-d
        scalars to log; anything else is passed on to `after_optimizer_step`."""
        raise NotImplementedError(f"{type(self).__name__} does not train (forward_step)")

    # ------------------------------------------------------------------ optional

    def check(self, cfg: Config, training: bool = True) -> None:
        """The task's own preflight before anything is built (its annotation files, ...): raise
        ConfigError / AnnotationError for a user mistake. Default: nothing to check."""

    def after_optimizer_step(self, model: nn.Module, outputs: list[dict[str, Any]]) -> None:
        """Once per optimizer step with the unwrapped model and every micro-batch's outputs (e.g.
        enqueue momentum features). The momentum EMA is not a task's: the engine runs it before
        each step's first forward (albef.engine.trainer.update_momentum)."""

    def find_unused_parameters(self, cfg: Config) -> bool:
        """Whether some trainable parameters get no gradient (DDP must then search for them)."""
        return False

    def init_weights(self, model: nn.Module, state: dict[str, Any], source: str) -> LoadReport:
        """`--init-from`: load a weight file's state dict (from `read_model_state`) into the model
        through the task's `weight_adapter` (the original's rule for its model family). Default
        (`ALBEF_ADAPTER`): the keys must match exactly (pos_embed resampled; missing feature
        queues kept)."""
        return self.weight_adapter.load(model, state, source)

    def evaluate(self, model: nn.Module, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        """Metrics on `split` ("val" or "test"), called on every rank with the unwrapped model.
        A task that does not override it has no evaluation (the engine skips it)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def evaluates(self) -> bool:
        """Whether this task overrides `evaluate`."""
        return type(self).evaluate is not Task.evaluate

    def format_result(self, result: dict[str, float]) -> str | None:
        """The task's own table of its % metrics (two decimals) for the terminal; None (the
        default): one row per metric (albef.engine.results.format_results)."""
        return None

    # ------------------------------------------------------------------ the command line

    @classmethod
    def main(cls, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        """`albef <task> ...` / `albef-<task>` / `python -m albef.tasks.<task>`: parse, validate,
        train or `--evaluate`; returns the exit code (albef/cli.py)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        return run_task(cls, argv, prog or f"albef-{cls.command_name()}", cls.description or cls.help_line(),
                        cls.flags, cls.config_help())

    @classmethod
    def command_name(cls) -> str:
        for name, entry in tasks().items():
            if entry.cls is cls:
                return name
        return cls.__name__

    @classmethod
    def config_help(cls) -> str:
        """The end of `--help`: this task's config section, one key a line with type and default."""
        shared = "model, loss, data, train, optim, eval"
        if not cls.config_section:
            return f"config: the shared sections ({shared}); this task owns no section of its own"
        lines = [f"config section '{cls.config_section}' (YAML, or {cls.config_section}.KEY=VALUE; "
                 f"also the shared sections {shared}):"]
        lines += [f"  {line}" for line in describe_fields(cls.config_class, cls.config_section + ".",
                                                           cls.config_ranges)]
        return "\n".join(lines)

    @classmethod
    def help_line(cls) -> str:
        return (cls.__doc__ or cls.__name__).strip().splitlines()[0]
