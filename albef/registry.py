"""The task registry: which tasks exist, and the config section each one owns.

A task module registers its class with `@register_task("name", help=...)` (albef/tasks/base.py
re-exports the decorator); the command line (`albef <task>`), the config (`Config` composes the
registered sections) and the documentation find tasks only here. `discover()` imports every
module of the `albef.tasks` package once, so every built-in task is registered before a config
is built or a task is looked up; a task defined elsewhere (a test file, a user's module)
registers itself when its module is imported.

This module imports nothing of albef at import time: it sits below config, engine and tasks.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TaskEntry", "SectionEntry", "register_task", "unregister_task", "tasks", "get_task", "sections", "discover"]


@dataclass(frozen=True)
class SectionEntry:
    """A config section a task owns: `cfg.<name>` is a `cls` instance; `ranges` as config.py's."""

    name: str
    cls: type
    ranges: dict[str, str] = field(default_factory=dict)
    task: str = ""


@dataclass(frozen=True)
class TaskEntry:
    name: str
    cls: type
    help: str


_TASKS: dict[str, TaskEntry] = {}
_SECTIONS: dict[str, SectionEntry] = {}
_discovered = False
TASK_PACKAGE = "albef.tasks"


def _same(a: type, b: type) -> bool:
    """The same class defined twice: once as `__main__` (`python -m albef.tasks.X`), once imported."""
    return a.__qualname__ == b.__qualname__ and "__main__" in (a.__module__, b.__module__)


def register_task(name: str, help: str | None = None):
    """Class decorator: register a task under `name` (the `albef <name>` command) with a one-line
    `help`, and its config section (`config_section`, `config_class`, `config_ranges`), if any."""

    def decorate(cls: type) -> type:
        line = help or (cls.__doc__ or name).strip().splitlines()[0]
        old = _TASKS.get(name)
        if old is not None and old.cls is not cls:
            if not _same(old.cls, cls):
                raise ValueError(f"task {name!r} is registered twice: {old.cls.__module__}.{old.cls.__qualname__} "
                                 f"and {cls.__module__}.{cls.__qualname__}")
            if cls.__module__ == "__main__":  # keep the importable definition
                return cls
        section = getattr(cls, "config_section", None)
        if section:
            owner = _SECTIONS.get(section)
            if owner is not None and owner.task != name:
                raise ValueError(f"config section {section!r} of task {name!r} is already owned by task {owner.task!r}")
            _SECTIONS[section] = SectionEntry(section, cls.config_class, dict(getattr(cls, "config_ranges", {})), name)
        _TASKS[name] = TaskEntry(name, cls, line)
        return cls

    return decorate


def unregister_task(name: str) -> None:
    """Forget task `name` and the config section it owns (tests that register a toy task)."""
    _TASKS.pop(name, None)
    for section in [s for s, entry in _SECTIONS.items() if entry.task == name]:
        del _SECTIONS[section]


def discover() -> None:
    """Import every module of the albef.tasks package (once), registering the built-in tasks."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(TASK_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{TASK_PACKAGE}.{info.name}")


def tasks() -> dict[str, TaskEntry]:
    """Every registered task by command name (built-in ones discovered first)."""
    discover()
    return dict(_TASKS)


def get_task(name: str) -> TaskEntry | None:
    discover()
    return _TASKS.get(name)


def sections() -> dict[str, SectionEntry]:
    """Every task-owned config section by name (built-in ones discovered first)."""
    discover()
    return dict(_SECTIONS)


def section_default(name: str) -> Any:
    return _SECTIONS[name].cls()
