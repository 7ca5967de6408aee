"""`python -m albef.pretrain` / `torchrun --nproc_per_node=N -m albef.pretrain` / `albef-pretrain`.

    albef-pretrain --config configs/pretrain.yaml [--output-dir DIR] [--resume auto|PATH] \
        [key.sub=value ...]

Exit codes: 0 done, 1 training stopped (non-finite losses, too much bad data, a resume or
checkpoint file that cannot be read or written), 2 bad config or
arguments (reported before any process group, data loading or GPU allocation),
75 (PREEMPTED_EXIT_CODE) stopped by SIGTERM/SIGUSR1 after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from albef.checkpoint import CheckpointError, resolve_resume
from albef.config import ConfigError, check_data_files, check_model_config, check_paths, load_config
from albef.data.datasets import BadDataError
from albef.dist import destroy_distributed, init_distributed
from albef.engine.trainer import TrainingError, train
from albef.tasks.pretrain import PretrainTask


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as a ConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="albef-pretrain", description="ALBEF pretraining (ITC + ITM + MLM).")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--resume", help="'auto' (newest checkpoint in output_dir, if any) or a checkpoint path")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        if args.output_dir:
            cfg.output_dir = args.output_dir
        check_paths(cfg)
        check_data_files(cfg)  # annotation and shard files
        check_model_config(cfg)  # sizes against timm and the BERT config
        resume = resolve_resume(args.resume, cfg.output_dir) if args.resume else None
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    dist_info = init_distributed()
    try:
        return train(cfg, PretrainTask(), dist_info, resume=str(resume) if resume else None)
    except ConfigError as e:  # found late, e.g. by the data pipeline
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (TrainingError, BadDataError, CheckpointError) as e:  # also a refused resume file
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
