"""`albef <command> ...`: one command for every task and tool.

    albef --help                          the commands, one line each
    albef pretrain --config CFG ...       a task: the same options as `albef-pretrain`
    albef retrieval --config CFG ...      (and every other registered task: ve, nlvr, vqa, ...)
    albef <task> --help                   its options and its config section (defaults, types)

Tasks are the ones registered with `@register_task` (albef/registry.py, albef/tasks/base.py);
tools are listed in TOOLS and imported only when run. The console scripts `albef-<task>` and
`python -m albef.tasks.<task>` remain aliases.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Iterator, Mapping, Sequence

from albef.registry import TaskEntry, get_task, tasks


class _RegisteredTasks(Mapping[str, TaskEntry]):
    """The registered tasks by command name, read from the registry when asked."""

    def __getitem__(self, name: str) -> TaskEntry:
        entry = get_task(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(tasks())

    def __len__(self) -> int:
        return len(tasks())


# Training/evaluation tasks: name -> TaskEntry (class, one-line help), from the registry.
TASKS: Mapping[str, TaskEntry] = _RegisteredTasks()

# Tools that are not tasks: name -> ("module:function", one-line description).
TOOLS: dict[str, tuple[str, str]] = {
    "demo": ("albef.demo:main", "generate the demo corpus, pretrain on it, print retrieval recall"),
    "export": ("albef.hub:export_main", "write a run or weight file as a pickle-free folder with a model card"),
    "push": ("albef.hub:push_main", "upload a run or exported folder to the Hugging Face Hub (private by default)"),
    "plan": ("albef.plan:main", "memory, largest batch, step/epoch time and data workers of a run on N GPUs, before it runs"),
}


def _resolve(target: str) -> Callable[[Sequence[str] | None], int]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def usage() -> str:
    registered = tasks()
    width = max(len(name) for name in (*registered, *TOOLS)) + 2
    lines = ["usage: albef <command> [options]   (albef <command> --help for its options and config section)",
             "", "tasks:"]
    lines += [f"  {name:<{width}}{entry.help}" for name, entry in registered.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}{help}" for name, (_, help) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in TOOLS:
        return int(_resolve(TOOLS[name][0])(rest) or 0)
    task = get_task(name)
    if task is None:
        sys.stderr.write(f"error: albef: unknown command {name!r} (one of: {', '.join([*tasks(), *TOOLS])})\n")
        return 2
    return int(task.cls.main(rest, f"albef {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
