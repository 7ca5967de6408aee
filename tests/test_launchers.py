"""The launch scripts give the ranks time to write a checkpoint after SIGTERM: torchrun (a stub
on PATH that records its environment and arguments) sees TORCH_ELASTIC_SHUTDOWN_TIMEOUT."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env bash
echo "timeout=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset} args=$*" >> "$LAUNCH_LOG"
"""
SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("script, env", [
    ("launch_single_node.sh", {"NPROC": "1"}),
    ("launch_multi_node.sh", {"NNODES": "1", "MASTER_ADDR": "localhost"}),
    ("slurm_pretrain.sbatch", {"SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "7"}),
])
@pytest.mark.parametrize("preset", [None, "900"])
def test_launchers_raise_torchrun_shutdown_timeout(tmp_path, script, env, preset):
    bin_dir, log = tmp_path / "bin", tmp_path / "launch.log"
    bin_dir.mkdir()
    _executable(bin_dir / "torchrun", STUB)
    _executable(bin_dir / "srun", SRUN)
    _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\necho node0\n")
    run_env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    run_env.update(env, PATH=f"{bin_dir}:{os.environ['PATH']}", LAUNCH_LOG=str(log))
    if preset:
        run_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = preset
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), "cfg.yaml", "out"], env=run_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = log.read_text()
    assert line.startswith(f"timeout={preset or 300} ") and "-m albef.pretrain" in line, line
