"""`albef <command>`: the one command line that names every task and tool."""
import subprocess

import pytest
import sys

from albef.command import TASKS, TOOLS, main


@pytest.mark.slow
def test_help_lists_every_task_and_tool(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in (*TASKS, *TOOLS):
        assert f"  {name} " in out


@pytest.mark.slow
def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'pretrian'" in err


@pytest.mark.slow
def test_python_m_albef_runs_a_task_help():
    out = subprocess.run([sys.executable, "-m", "albef", "ve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--init-from" in out.stdout


def _console_scripts() -> dict[str, str]:
    """setup.py's console scripts: name -> 'module:function'."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    return dict(re.findall(r'"(albef[\w-]*)=([\w.]+:\w+)"', text))


def test_every_old_console_script_still_runs_its_task(capsys):
    import importlib

    from albef.registry import tasks

    scripts = _console_scripts()
    registered = tasks()
    old = ("pretrain", "retrieval", "ve", "nlvr", "nlvr-pretrain", "vqa", "grounding")
    assert {f"albef-{name}" for name in old} <= scripts.keys()  # each old task keeps its alias
    for script, target in scripts.items():
        module, _, function = target.partition(":")
        entry = getattr(importlib.import_module(module), function)
        try:
            code = entry(["--help"])
        except SystemExit as stop:  # argparse's --help
            code = stop.code
        assert code == 0, script
        out = capsys.readouterr().out
        task = script.removeprefix("albef-")
        if task in registered:  # the task's own options and its config section
            assert f"usage: {script} " in out and "--init-from" in out and "config" in out.split("--evaluate")[-1]


@pytest.mark.slow
def test_python_m_task_module_is_an_alias():
    out = subprocess.run([sys.executable, "-m", "albef.tasks.vqa", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: albef-vqa" in out.stdout and "vqa.k_test" in out.stdout
