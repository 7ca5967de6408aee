"""The command line shared by every task: `albef-pretrain`, `albef-retrieval`, `albef-ve`, ...

    albef-<task> --config CFG [--output-dir DIR] [--resume auto|PATH] [--init-from PATH]
                 [--evaluate] [key.sub=value ...]

Overrides may stand anywhere on the line. `--init-from` starts training from weights (ours,
`.pt` or `.dcp`, or a released ALBEF file), mapped onto the task's model by the task's rule;
`--resume` continues this run's own checkpoint and takes precedence when one exists.
`--evaluate` only evaluates (val and test): the weights of `--init-from`, else the run's
best.pt, else its newest checkpoint; it writes to OUTPUT_DIR/eval/ unless --output-dir is given.

Exit codes (training and `--evaluate` alike): 0 done; 1 training stopped (non-finite losses, too
much bad data, a checkpoint that cannot be written, a `--resume` checkpoint that cannot be read);
2 a user mistake (config, arguments, data files, an `--init-from` weight file that is missing,
refused or does not fit), reported in one line before anything trains; 75 preempted after saving
a checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from albef.checkpoint import CheckpointError, resolve_resume, run_weights
from albef.build import check_model_config
from albef.config import Config, ConfigError, check_paths, load_config
from albef.data.datasets import AnnotationError, BadDataError
from albef.dist import destroy_distributed, init_distributed
from albef.engine.trainer import InitError, Trainer, TrainingError, evaluate_only

USER_ERRORS = (ConfigError, CheckpointError, AnnotationError)


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as a ConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see --help)")


# A task's own flag: `--flag VALUE` sets one config key (the value is parsed as an override).
TaskFlags = Mapping[str, tuple[str, str]]  # {"--save-examples": ("eval.save_examples", help)}


def build_parser(prog: str, description: str, flags: TaskFlags | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """The shared options plus the task's `flags`; `epilog` (e.g. the task's config section)
    closes --help as written."""
    parser = _Parser(prog=prog, description=description, epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--resume", help="'auto' (newest checkpoint in output_dir, if any) or a checkpoint path")
    parser.add_argument("--init-from", help="start from these weights (sets model.init_checkpoint): our .pt/.dcp "
                        "checkpoint or run directory, a released ALBEF .pth, an `albef export` folder or hf-hub:org/name")
    parser.add_argument("--evaluate", action="store_true", help="evaluate on val/test only, no training; "
                        "writes to OUTPUT_DIR/eval/ unless --output-dir is given")
    for flag, (key, help) in (flags or {}).items():
        parser.add_argument(flag, dest=key, metavar="N", help=f"{help} (sets {key})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def parse(argv: Sequence[str] | None, prog: str, description: str,
          flags: TaskFlags | None = None, epilog: str | None = None) -> tuple[argparse.Namespace, Config]:
    """Arguments and the validated config (paths checked); raises ConfigError."""
    args = build_parser(prog, description, flags, epilog).parse_intermixed_args(argv)
    flag_overrides = [f"{key}={getattr(args, key)}" for key, _ in (flags or {}).values() if getattr(args, key) is not None]
    cfg = load_config(args.config, list(args.overrides) + flag_overrides)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.init_from:
        cfg.model.init_checkpoint = args.init_from
        cfg._origins.mark("model.init_checkpoint", args.init_from, f"--init-from {args.init_from}")
    check_paths(cfg, training=not args.evaluate)
    check_model_config(cfg)  # sizes against timm and the BERT config
    return args, cfg


def evaluation_weights(cfg: Config) -> str | None:
    """What `--evaluate` evaluates: model.init_checkpoint, else OUTPUT_DIR/best.pt, else the
    run's newest checkpoint, else nothing (the freshly built model, e.g. zero-shot from init)."""
    if cfg.model.init_checkpoint:
        return cfg.model.init_checkpoint
    weights = run_weights(cfg.output_dir)
    return str(weights) if weights else None


def evaluation_output_dir(output_dir: str) -> str:
    """Where `--evaluate` writes when no --output-dir is given: OUTPUT_DIR/eval, so zero-shot
    evaluations never mix their results and log lines with a training run of the same config."""
    return str(Path(output_dir) / "eval")


def _fail(err: BaseException, code: int) -> int:
    # One write call: the lines of several ranks sharing a pipe must not interleave mid-line.
    sys.stderr.write(f"error: {err}\n")
    sys.stderr.flush()
    return code


def run_task(make_task: Callable[[], Any], argv: Sequence[str] | None, prog: str, description: str,
             flags: TaskFlags | None = None, epilog: str | None = None) -> int:
    """Parse, validate, build and run one task: train (or `--evaluate`); returns the exit code.
    `flags`: the task's own `--flag VALUE` options, each setting one config key; `epilog`: the
    end of --help."""
    try:
        args, cfg = parse(argv, prog, description, flags, epilog)
        resume = resolve_resume(args.resume, cfg.output_dir) if args.resume and not args.evaluate else None
        task = make_task()
        task.check(cfg, training=not args.evaluate)  # the task's own preflight (its annotation files, ...)
    except USER_ERRORS as err:
        return _fail(err, 2)

    dist_info = init_distributed()
    try:
        if args.evaluate:
            weights = evaluation_weights(cfg)  # the run's own weights are found in output_dir
            if not args.output_dir:  # the default folder is the training run's: keep them apart
                cfg.output_dir = evaluation_output_dir(cfg.output_dir)
            try:
                evaluate_only(cfg, task, dist_info, weights)
            except USER_ERRORS as err:
                return _fail(err, 2)
            return 0
        try:
            trainer = Trainer(cfg, task, dist_info, resume=str(resume) if resume else None)
        except (ConfigError, AnnotationError, InitError) as err:  # e.g. an --init-from file that does not fit
            return _fail(err, 2)
        except CheckpointError as err:  # the run's own checkpoint cannot be resumed
            return _fail(err, 1)
        try:
            return trainer.fit()
        except ConfigError as err:  # found late, e.g. by the data pipeline
            return _fail(err, 2)
        except (TrainingError, BadDataError, CheckpointError, AnnotationError) as err:
            return _fail(err, 1)
    finally:
        destroy_distributed()

