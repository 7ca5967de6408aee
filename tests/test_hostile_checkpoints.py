"""Nothing stored in a checkpoint runs: crafted `.dcp` directories (a `.metadata` pickle, a byte
entry of a shard file) are refused in one line naming the file, and a marker file that the
payload would create never appears, also through `python -m albef.pretrain --resume auto`.
"""

import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

import albef.checkpoint as checkpoint
from albef.checkpoint import (DCP_TRAINER_STATE, CheckpointError, check_dcp_directory, load_checkpoint_file,
                              load_dcp_state, resolve_resume)
from conftest import tiny_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "test_tiny.yaml"


class _Touch:
    """Unpickling this creates `marker` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _dcp_state() -> dict:
    """A model and AdamW state as `get_state_dict` gives them: tensors plus byte entries (lr...)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def write_dcp(path: Path, state: dict | None = None, step: int = 9) -> Path:
    """A genuine .dcp checkpoint directory, as the engine writes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save(state or _dcp_state(), checkpoint_id=path)
    torch.save({"train_state": {"epoch": 0, "step": step, "consumed": 0, "nonfinite_steps": 0}},
               path / DCP_TRAINER_STATE)
    return path


def craft_metadata(path: Path, marker: Path) -> None:
    with open(path / ".metadata", "wb") as f:
        pickle.dump(_Touch(marker), f)


def craft_byte_entry(path: Path, marker: Path) -> str:
    """Point one byte entry (an optimizer hyperparameter) at a torch.save'd payload; the metadata
    itself stays legitimate. Returns the entry's name."""
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own, freshly written file
    payload = io.BytesIO()
    torch.save(_Touch(marker), payload)
    (path / "__9_9.distcp").write_bytes(payload.getvalue())
    index = next(i for i in metadata.storage_data
                 if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = metadata.storage_data[index]
    info.relative_path, info.offset, info.length = "__9_9.distcp", 0, len(payload.getvalue())
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return index.fqn


def test_genuine_dcp_directory_passes_and_loads(tmp_path):
    saved = _dcp_state()
    path = write_dcp(tmp_path / "step_00000009.dcp", saved)
    check_dcp_directory(path)
    target = _dcp_state()
    target["optimizer"]["param_groups"][0]["lr"] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp_state(target, path)
    assert target["optimizer"]["param_groups"][0]["lr"] == 1e-3  # a byte entry
    assert torch.equal(target["model"]["weight"], saved["model"]["weight"])
    assert torch.equal(target["optimizer"]["state"]["weight"]["exp_avg"], saved["optimizer"]["state"]["weight"]["exp_avg"])


def test_crafted_metadata_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write_dcp(tmp_path / "step_00000009.dcp")
    craft_metadata(path, marker)
    with pytest.raises(CheckpointError) as err:
        check_dcp_directory(path)
    assert str(err.value).startswith(f"{path / '.metadata'}: refused to load") and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"\.metadata: refused"):
        load_dcp_state(_dcp_state(), path)
    assert not marker.exists()


def test_crafted_byte_entry_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = write_dcp(tmp_path / "step_00000009.dcp")
    fqn = craft_byte_entry(path, marker)
    with pytest.raises(CheckpointError) as err:
        check_dcp_directory(path)
    assert str(err.value).startswith(f"{path / '__9_9.distcp'}: refused to load (entry '{fqn}')")
    # DCP's own loader would unpickle the entry unrestricted; ours does not, even unchecked.
    monkeypatch.setattr(checkpoint, "check_dcp_directory", lambda p: None)
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match=f"DCP entry '{fqn}': refused to load"):
        warnings.simplefilter("ignore")
        load_dcp_state(_dcp_state(), path)
    assert not marker.exists()


def test_shard_outside_the_directory_or_missing_is_refused(tmp_path):
    path = write_dcp(tmp_path / "step_00000009.dcp")
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../elsewhere.distcp"
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        check_dcp_directory(path)
    write_dcp(path)
    next(path.glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: missing"):
        check_dcp_directory(path)


def test_crafted_trainer_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = write_dcp(tmp_path / "step_00000009.dcp")
    torch.save({"train_state": _Touch(marker)}, path / DCP_TRAINER_STATE)
    with pytest.raises(CheckpointError, match="trainer_state.pt: refused to load"):
        resolve_resume(str(path), tmp_path)
    assert not marker.exists()


def test_raw_pickle_is_refused_without_a_torch_warning(tmp_path, recwarn):
    marker, path = tmp_path / "pwned", tmp_path / "raw.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Touch(marker)}, f, protocol=4)  # torch warns about protocol 4
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint_file(path)
    assert not [w for w in recwarn if "protocol" in str(w.message)]
    assert not marker.exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "albef.pretrain", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("crafted", ["metadata", "byte entry", "raw pickle"])
def test_resume_from_a_crafted_checkpoint_stops_in_one_line(tmp_path, crafted):
    """--resume auto through `latest` for the .dcp cases; an explicit path for the raw pickle
    (`auto` never picks a file that is not a torch zip archive)."""
    corpus = tiny_corpus(tmp_path / "corpus", num_train=8)
    run, marker = tmp_path / "run", tmp_path / "pwned"
    ckpt_dir = run / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    resume = "auto"
    if crafted == "raw pickle":
        refused = resume = tmp_path / "raw.pt"
        with open(refused, "wb") as f:
            pickle.dump({"model": _Touch(marker)}, f, protocol=4)
    else:
        path = write_dcp(ckpt_dir / "step_00000009.dcp")
        (ckpt_dir / "latest").write_text(path.name + "\n")
        if crafted == "metadata":
            craft_metadata(path, marker)
            refused = path / ".metadata"
        else:
            craft_byte_entry(path, marker)
            refused = path / "__9_9.distcp"
    result = _run_cli("--config", str(CONFIG), "--output-dir", str(run), "--resume", str(resume),
                      f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
                      f"model.text.bert={corpus['bert']}")
    assert result.returncode in (1, 2), result.stderr
    assert result.stderr.startswith(f"error: {refused}: refused to load"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not marker.exists()
