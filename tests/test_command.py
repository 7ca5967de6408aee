"""`albef <command>`: the one command line that names every task and tool."""
import subprocess
import sys

from albef.command import TASKS, TOOLS, main


def test_help_lists_every_task_and_tool(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in (*TASKS, *TOOLS):
        assert f"  {name} " in out


def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'pretrian'" in err


def test_python_m_albef_runs_a_task_help():
    out = subprocess.run([sys.executable, "-m", "albef", "ve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--init-from" in out.stdout
