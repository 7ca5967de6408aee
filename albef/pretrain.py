"""`python -m albef.pretrain` / `torchrun --nproc_per_node=N -m albef.pretrain` / `albef-pretrain`.

    albef-pretrain --config configs/pretrain.yaml [--output-dir DIR] [--resume auto|PATH] \
        [--init-from PATH] [key.sub=value ...]

Exit codes: 0 done, 1 training stopped (non-finite losses, too much bad data, a checkpoint file
that cannot be read or written), 2 bad config, arguments, data files or weight file (reported
before any training), 75 (PREEMPTED_EXIT_CODE) stopped by SIGTERM/SIGUSR1 after saving a
checkpoint. See albef/cli.py.
"""

from __future__ import annotations

import sys
from typing import Sequence

from albef.tasks.pretrain import PretrainTask


def main(argv: Sequence[str] | None = None) -> int:
    return PretrainTask.main(argv, "albef-pretrain")


if __name__ == "__main__":
    sys.exit(main())
