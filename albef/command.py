"""`albef <command> ...`: one command for every task and tool.

    albef --help                          the commands, one line each
    albef pretrain --config CFG ...       a task: the same options as `albef-pretrain`
    albef retrieval --config CFG ...      (and ve, nlvr, nlvr-pretrain, vqa, grounding, ...)

Tasks and tools are looked up by name and imported only when run, so `albef --help` stays fast.
The console scripts `albef-<task>` and `python -m albef.tasks.<task>` remain aliases.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

# Training/evaluation tasks: name -> ("module:function", one-line description).
TASKS: dict[str, tuple[str, str]] = {
    "pretrain": ("albef.pretrain:main", "ALBEF pretraining (ITC + ITM + MLM) from a YAML config"),
    "retrieval": ("albef.tasks.retrieval:main", "image-text retrieval fine-tuning and evaluation (R@1/5/10)"),
    "ve": ("albef.tasks.ve:main", "SNLI-VE visual entailment fine-tuning and evaluation"),
    "nlvr": ("albef.tasks.nlvr:main", "NLVR2 fine-tuning and evaluation"),
    "nlvr-pretrain": ("albef.tasks.nlvr_pretrain:main", "NLVR2 text-assignment pretraining"),
    "vqa": ("albef.tasks.vqa:main", "VQA fine-tuning and evaluation (answer generation)"),
    "grounding": ("albef.tasks.grounding:main", "weakly supervised visual grounding (Grad-CAM)"),
}

# Tools that are not tasks: name -> ("module:function", one-line description).
TOOLS: dict[str, tuple[str, str]] = {
    "demo": ("albef.demo:main", "generate the demo corpus, pretrain on it, print retrieval recall"),
    "plan": ("albef.plan:main", "memory, largest batch, step/epoch time and data workers of a run on N GPUs, before it runs"),
}


def _resolve(target: str) -> Callable[[Sequence[str] | None], int]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def usage() -> str:
    width = max(len(name) for name in (*TASKS, *TOOLS)) + 2
    lines = ["usage: albef <command> [options]   (albef <command> --help for its options)", "", "tasks:"]
    lines += [f"  {name:<{width}}{help}" for name, (_, help) in TASKS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}{help}" for name, (_, help) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    entry = TASKS.get(name) or TOOLS.get(name)
    if entry is None:
        sys.stderr.write(f"error: albef: unknown command {name!r} (one of: {', '.join([*TASKS, *TOOLS])})\n")
        return 2
    return int(_resolve(entry[0])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
