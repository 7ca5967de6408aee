"""Checkpoint I/O: safe reading of every weight format (`read_model_state`, the one reader of
`--init-from`, `albef.load` and `albef export`), atomic and asynchronous saving with
keep-last-K, resume lookup. Matching what was read to a model (`match_state_dict`,
`LoadReport`, position-embedding resampling) is albef/weights.py; its names are re-exported here.

Nothing here unpickles code: `.pt`/`.pth`/`.bin` files are read with `torch.load(weights_only=True)`,
`.safetensors` files with safetensors, and a `.dcp` directory only after `check_dcp_directory`
(its `.metadata` through an unpickler that knows only DCP's metadata classes, its byte entries
and `trainer_state.pt` with weights_only), then through `load_dcp_state`, whose reader and
planner keep to the same rules. Training checkpoints must therefore hold only tensors,
numbers, strings, lists, tuples and dicts (store e.g. numpy RNG state as a tensor or list).

Layout written by the engine: `ckpt_dir/step_XXXXXXXX.pt`, each written to a temp name in the
same directory, fsynced and renamed, then the pointer file `ckpt_dir/latest` (the name of the
newest step file) is replaced last. A crash at any point leaves the previous checkpoint and
pointer intact. FSDP runs write `step_XXXXXXXX.dcp/` directories instead (torch.distributed.checkpoint
shards plus `trainer_state.pt`, see albef/engine/fsdp.py): written under a temp name, renamed
whole by `publish_checkpoint_dir`, then the same pointer and pruning rules apply.
"""
from __future__ import annotations

import copy
import errno
import io
import json
import os
import pickle
import re
import shutil
import socket
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

# weight adaptation (albef/weights.py), re-exported for callers that import it from here
from albef.exported import first_line, is_export_dir, is_hub_name, read_export
from albef.weights import (CheckpointError, LoadReport, _tied_groups, load_weights, map_albef_keys,
                           match_state_dict, resample_pos_embed)

__all__ = [
    "CheckpointError", "LoadReport", "load_checkpoint_file", "save_checkpoint", "find_latest",
    "checkpoint_dir", "best_checkpoint", "run_weights", "resolve_resume", "map_albef_keys", "match_state_dict", "load_pretrained",
    "save_pretrained", "tmp_checkpoint_dir", "publish_checkpoint_dir", "is_dcp_checkpoint",
    "DCP_TRAINER_STATE", "resample_pos_embed", "load_training_state", "check_dcp_directory",
    "load_dcp_state", "checkpoint_step", "read_model_state", "read_weights", "load_weights", "confined",
]

LATEST = "latest"
_STEP_RE = re.compile(r"step_(\d+)\.(?:pt|dcp)")
_TMP_RE = re.compile(r"\.(?:step_\d+\.(?:pt|dcp(?:\.old)?)|latest)\.(?P<host>.+)\.(?P<pid>\d+)\.tmp")
DCP_TRAINER_STATE = "trainer_state.pt"  # rank 0's non-tensor state inside a .dcp directory
_DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint once every shard is saved

# ----------------------------------------------------------------------------- reading


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                         ) -> dict[str, Any]:
    """Read a `.safetensors` or torch file without executing any code stored in it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(path, device=str(map_location))
        else:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says it all
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(_refused(path)) from None
    except Exception as err:  # torch/zip/safetensors report damage with many exception types
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or "
                              f"corrupt ({type(err).__name__}: {first_line(err)})") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found a {type(obj).__name__}")
    return obj


def _refused(path: Path | str, what: str = "") -> str:
    return (f"{path}: refused to load{what}: it contains code or objects that are not plain tensors "
            "(numbers, strings, lists, dicts), which will not be executed; re-save the weights "
            "as a plain state dict or .safetensors from a trusted source")


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a temp file in the same directory: fsync, rename, fsync the dir.

    On any OSError the temp file is removed, `path` keeps its previous content, and a
    CheckpointError naming `path` is raised.
    """
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        raise CheckpointError(f"could not write {path}: {err.strerror or err}") from err


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where the filesystem cannot do it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(f"could not remove {path}: {err.strerror or err}", stacklevel=3)


def save_checkpoint(state: dict[str, Any], ckpt_dir: str | os.PathLike, step: int,
                    keep_last: int) -> Path:
    """Atomically write `ckpt_dir/step_{step:08d}.pt`, point `latest` at it, prune old ones.

    Keeps the newest `keep_last` step files (and always the one `latest` names); removes temp
    files that crashed writers on this host left behind. Raises CheckpointError (previous
    checkpoint and pointer untouched) when the disk is full or the directory is not writable.
    Call it on one rank only.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (got {keep_last})")
    ckpt_dir = Path(ckpt_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"could not create {ckpt_dir}: {err.strerror or err}") from err
    path = ckpt_dir / f"step_{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(ckpt_dir / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
    _prune(ckpt_dir, keep_last)
    return path


def stage_to_cpu(obj: Any, buffers: list[torch.UntypedStorage] | None = None) -> Any:
    """A copy of `obj` (nested dicts, lists, tuples) whose tensors are CPU copies, detached from
    the live model and optimizer, so that it can be written while training goes on.

    Each storage is copied once and its tensors are rebuilt as views of the copy (same offset,
    size and stride), so the copy is what `torch.save` would write: tensors that share memory
    (tied weights) still share it. `buffers` (a list, filled in order of first use) holds the
    copies; passing the list of the previous call reuses those whose size matches (no new
    allocation, 3x faster on CPU), so it must no longer be in use."""
    return _stage(obj, {}, [] if buffers is None else buffers, [0])


def _stage(obj: Any, seen: dict, buffers: list, used: list[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), tensor.device)
        staged = seen.get(key) if storage.nbytes() else None
        if staged is None:
            i, used[0] = used[0], used[0] + 1
            if i < len(buffers) and buffers[i].nbytes() == storage.nbytes():
                staged = buffers[i].copy_(storage)
            else:
                staged = storage.cpu() if tensor.device.type != "cpu" else storage.clone()
                buffers[i:i + 1] = [staged]
            seen[key] = staged
        return torch.empty(0, dtype=tensor.dtype).set_(staged, tensor.storage_offset(), tensor.size(), tensor.stride())
    if isinstance(obj, dict):
        return type(obj)((k, _stage(v, seen, buffers, used)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_stage(v, seen, buffers, used) for v in obj)
    if isinstance(obj, (int, float, str, bytes, bool, type(None))):
        return obj
    return copy.deepcopy(obj)  # numpy arrays and other small values


class CheckpointWriter:
    """`save_checkpoint` with the file written in a background thread (train.async_checkpoint).

    `save` stages the state to CPU (`stage_to_cpu`) on the calling thread, so training may change
    the model right after it returns, then writes it as `save_checkpoint` does: temp file, fsync,
    rename, `latest`, prune; a kill at any point leaves the previous checkpoint in force. One
    write is in flight at a time: `save` first waits for the previous one. `wait()` (call it
    before the process exits) returns when the write is done and re-raises its error (a
    CheckpointError for a full disk), so a failed write stops the run at the next save or at the
    end, not silently. With `background=False` `save` writes before it returns. The CPU copy is
    kept between saves and refilled by the next one (host memory: one copy of the state).
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: list[torch.UntypedStorage] = []  # CPU copies, reused by the next save

    def save(self, state: dict[str, Any], ckpt_dir: str | os.PathLike, step: int, keep_last: int) -> Path:
        """Write `state` as `ckpt_dir/step_{step:08d}.pt` (see `save_checkpoint`); returns that path."""
        self.wait()
        if not self.background:
            return save_checkpoint(state, ckpt_dir, step, keep_last)
        staged = stage_to_cpu(state, self._buffers)  # the previous write is done: its buffers are free
        self._thread = threading.Thread(target=self._write, args=(staged, ckpt_dir, step, keep_last),
                                        name=f"checkpoint-step-{step}")
        self._thread.start()
        return Path(ckpt_dir) / f"step_{step:08d}.pt"

    def _write(self, state: dict[str, Any], ckpt_dir: str | os.PathLike, step: int, keep_last: int) -> None:
        try:
            save_checkpoint(state, ckpt_dir, step, keep_last)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; re-raise its error."""
        error = self.close()
        if error is not None:
            raise error

    def close(self) -> BaseException | None:
        """Block until the write in flight (if any) is on disk; return its error (None: written)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error


def tmp_checkpoint_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temp directory name for the checkpoint of `step` (`publish_checkpoint_dir` renames it)."""
    return _tmp_name(Path(ckpt_dir) / f"step_{step:08d}.dcp")


def publish_checkpoint_dir(tmp: str | os.PathLike, trainer_state: dict[str, Any],
                           ckpt_dir: str | os.PathLike, step: int, keep_last: int) -> Path:
    """Add `trainer_state` to the completely written shard directory `tmp`, rename it to
    `ckpt_dir/step_{step:08d}.dcp`, point `latest` at it and prune as `save_checkpoint` does.
    Call it on one rank only."""
    ckpt_dir, tmp = Path(ckpt_dir), Path(tmp)
    path = ckpt_dir / f"step_{step:08d}.dcp"
    _atomic_write(tmp / DCP_TRAINER_STATE, lambda f: torch.save(trainer_state, f))
    old = _tmp_name(path.with_name(f"{path.name}.old"))  # same step, written by an earlier attempt
    try:
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(ckpt_dir)
    except OSError as err:
        raise CheckpointError(f"could not write {path}: {err.strerror or err}") from err
    _remove(old)
    _atomic_write(ckpt_dir / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
    _prune(ckpt_dir, keep_last)
    return path


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """True for a `step_*.dcp` directory (complete or not)."""
    return Path(path).suffix == ".dcp" and Path(path).is_dir()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _step_files(ckpt_dir: Path) -> list[Path]:
    """Renamed (hence complete when written) step files and .dcp directories, oldest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if (m := _STEP_RE.fullmatch(p.name)) and (p.is_dir() if p.suffix == ".dcp" else p.is_file())]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in a `step_XXXXXXXX.pt` / `.dcp` name, or None for another name."""
    m = _STEP_RE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def confined(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """`path`, after checking that it resolves (links followed) to a place inside `root`;
    CheckpointError in one line otherwise. Everything read through a run directory (step files,
    `latest`, best.pt, a .dcp directory's files, config.yaml) passes through here, so a link
    planted in a downloaded run cannot make us read a file elsewhere."""
    path, root = Path(path), Path(root)
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{path}: a link to {real}, outside {root}; refusing to read it (replace the "
                              f"link by the file itself, or pass the file's own path)")
    return path


def _read_pointer(ckpt_dir: Path) -> Path | None:
    try:
        name = confined(ckpt_dir / LATEST, ckpt_dir).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return ckpt_dir / name if _STEP_RE.fullmatch(name) else None


def _is_stale_tmp(name: str) -> bool:
    """A temp file of ours whose writer (a process on this host) no longer runs."""
    m = _TMP_RE.fullmatch(name)
    if m is None or m["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    steps = _step_files(ckpt_dir)
    keep = set(steps[-keep_last:]) | {_read_pointer(ckpt_dir)}
    for path in steps:
        if path not in keep:
            _remove(path)
    for path in ckpt_dir.iterdir():
        if _is_stale_tmp(path.name):
            _remove(path)


# ----------------------------------------------------------------------------- resuming


def _is_complete(path: Path) -> bool:
    """True when `path` is an intact torch zip archive (central directory and CRCs check), or a
    .dcp directory with DCP's metadata and an intact trainer state."""
    if path.suffix == ".dcp":
        metadata, trainer_state = confined(path / _DCP_METADATA, path), confined(path / DCP_TRAINER_STATE, path)
        return metadata.is_file() and _is_complete(trainer_state)
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names if intact, else the newest intact `step_*.pt` or
    `step_*.dcp/`, else None.

    Temp files are never candidates; a damaged file is skipped with a warning naming it.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    candidates = _step_files(ckpt_dir)[::-1]
    pointed = _read_pointer(ckpt_dir)
    if pointed in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    for path in candidates:
        if _is_complete(confined(path, ckpt_dir)):
            return path
        warnings.warn(f"skipping checkpoint {path}: truncated or corrupt; trying an older one",
                      stacklevel=2)
    return None


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where the engine keeps a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def best_checkpoint(output_dir: str | os.PathLike) -> Path:
    """Where a run keeps the weights (and config) of its best evaluation: OUTPUT_DIR/best.pt."""
    return Path(output_dir) / "best.pt"


def run_weights(run_dir: str | os.PathLike) -> Path | None:
    """The weights a run directory stands for: its best.pt, else its newest intact checkpoint
    (in RUN/checkpoints or RUN itself), else None."""
    best = best_checkpoint(run_dir)
    if best.is_file() or best.is_symlink():
        return confined(best, run_dir)
    return find_latest(confined(checkpoint_dir(run_dir), run_dir)) or find_latest(run_dir)


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Checkpoint for `--resume`: None (fresh run), `auto` (newest in this run, or None) or a path.

    A directory path means its newest intact checkpoint (the run dir or its checkpoints dir). A
    `.dcp` result has passed `check_dcp_directory`.
    """
    path = _resolve_resume_path(resume, output_dir)
    if path is not None and is_dcp_checkpoint(path):
        check_dcp_directory(path)
    return path


def _resolve_resume_path(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(checkpoint_dir(output_dir))
    path = Path(resume)
    if is_dcp_checkpoint(path):
        if not _is_complete(path):
            raise CheckpointError(f"--resume {path}: incomplete .dcp checkpoint (no {_DCP_METADATA} "
                                  f"or {DCP_TRAINER_STATE}); resume from an older one")
        return path
    if path.is_dir():
        found = find_latest(path) or find_latest(confined(checkpoint_dir(path), path))
        if found is None:
            raise CheckpointError(f"--resume {path}: no intact step_*.pt or step_*.dcp "
                                  "checkpoint in it")
        return found
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such file (use --resume auto to continue "
                              "from the newest checkpoint in output_dir)")
    return path


# ----------------------------------------------------------------------------- .dcp directories

# Everything a DCP `.metadata` pickle may name (what torch.distributed.checkpoint writes); an
# unpickler that knows nothing else cannot be made to call anything else.
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its dataclasses, torch.Size, dtypes, layouts, paths; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"'{module}.{name}' is not part of DCP metadata")


def _read_dcp_metadata(file: Path) -> Metadata:
    """The `Metadata` in `file`, unpickled without running anything, or CheckpointError."""
    try:
        with open(file, "rb") as f:
            metadata = _DCPMetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the .dcp checkpoint is incomplete, resume from an "
                              "older one") from None
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{_refused(file)} ({first_line(err)})") from None
    except Exception as err:  # truncated or damaged pickles fail in many ways
        raise CheckpointError(f"{file}: cannot read DCP metadata, the file is truncated or corrupt "
                              f"({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: not DCP metadata (found a {type(metadata).__name__})")
    return metadata


def check_dcp_directory(path: str | os.PathLike) -> None:
    """Check every file of the `.dcp` directory `path` that loading it reads, running nothing.

    `.metadata` goes through an unpickler that knows only DCP's metadata classes; the shard files
    it names must be plain files inside `path`; each non-tensor ("bytes") entry of a shard is
    loaded with weights_only (DCP itself would unpickle those unrestricted, `load_dcp_state` does
    not); `trainer_state.pt`, when present, with `load_checkpoint_file`. Tensor entries are read
    by DCP with weights_only. Raises CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a .dcp checkpoint directory")
    for name in os.listdir(path):  # every file DCP may open: .metadata, shards, rank-local metadata
        confined(path / name, path)
    metadata = _read_dcp_metadata(path / _DCP_METADATA)
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path / _DCP_METADATA}: names a shard outside the checkpoint "
                                  f"directory ({name!r}); refusing to read it")
        shard = confined(path / name, path)
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing; the .dcp checkpoint is incomplete, resume from "
                                  "an older one")
        entry = metadata.state_dict_metadata.get(getattr(index, "fqn", None))
        if isinstance(entry, BytesStorageMetadata) and not info.transform_descriptors:
            _check_dcp_bytes(shard, info.offset, info.length, index.fqn)
    if (path / DCP_TRAINER_STATE).exists():
        load_checkpoint_file(path / DCP_TRAINER_STATE)


def _check_dcp_bytes(shard: Path, offset: int, length: int, fqn: str) -> None:
    with open(shard, "rb") as f:
        f.seek(offset)
        data = io.BytesIO(f.read(length))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(_refused(shard, f" (entry '{fqn}')")) from None
    except Exception as err:
        raise CheckpointError(f"{shard}: entry '{fqn}' is truncated or corrupt "
                              f"({type(err).__name__}: {first_line(err)})") from None


class _SafeDCPReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `_DCPMetadataUnpickler` (DCP uses plain pickle)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # rank-local metadata: a fallback DCP tries when .metadata fails
        name = _DCP_METADATA if rank is None else f"__{rank}{_DCP_METADATA}"
        metadata = _read_dcp_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are unpickled with weights_only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(_refused(f"DCP entry '{read_item.dest_index.fqn}'")) from None
        # Hand the parent (which places the value in the state dict) a re-serialised copy of
        # what was just loaded safely: it contains only plain data.
        safe = io.BytesIO()
        torch.save(obj, safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


def load_dcp_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Fill the DCP state dict `state` in place from the `.dcp` directory `path` (any world size;
    every rank calls it). Nothing stored in the directory runs: see `check_dcp_directory`.

    DCP reports failures as a CheckpointException (a BaseException) holding each rank's error;
    the first of these is raised instead.
    """
    check_dcp_directory(path)
    try:
        with warnings.catch_warnings():  # "...assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=_SafeDCPReader(path), planner=_WeightsOnlyLoadPlanner())
    except CheckpointException as err:
        failures = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
        first = next((f for f in failures if isinstance(f, Exception)), None)
        if first is None:
            raise CheckpointError(f"{path}: cannot load ({first_line(err)})") from err
        raise first from None



# ----------------------------------------------------------------------------- pretrained


def load_training_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Strict load of a training checkpoint's model state (resume must be exact); a checkpoint of
    another architecture fails in one line naming the mismatching keys and shapes."""
    target = model.state_dict()
    problems = [f"missing {k}" for k in sorted(target.keys() - state.keys())]
    problems += [f"unexpected {k}" for k in sorted(state.keys() - target.keys())]
    problems += [f"{k}: checkpoint {list(state[k].shape)} vs model {list(target[k].shape)}"
                 for k in sorted(target.keys() & state.keys()) if state[k].shape != target[k].shape]
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{path}: does not fit this model ({'; '.join(problems[:5])}{more}); resume with the config "
            "the run was started with (its config.yaml) or use a new output_dir")
    model.load_state_dict(state)


def unwrap_model_state(ckpt: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The state dict of our checkpoints / ALBEF's (under 'model') or of a plain state dict."""
    state = next((ckpt[k] for k in ("model", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: not a model state dict: '{key}' holds a "
                                  f"{type(value).__name__}, not a tensor")
    return state


def read_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of any weight file we accept, with ALBEF's text-encoder keys mapped to
    ours: this framework's `.pt` checkpoints and `.dcp` directories, released ALBEF `.pth`
    files (`{'model': state_dict}`), plain state dicts and `.safetensors`, folders written by
    `albef export` and `hf-hub:org/name[@revision]` names (albef.hub). Nothing in the file is
    executed."""
    return read_weights(path)[0]


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any]:
    """(`read_model_state`'s weights, the config stored with them or None), the file read once:
    a `.pt` file's 'config' entry (when a dict), a `.safetensors` file's 'config' metadata (its
    text), an exported folder's config; a `.dcp` directory stores none."""
    if is_hub_name(path) or is_export_dir(path):
        _, state, stored = read_export(path)
        return state, stored
    path = Path(path)
    if path.is_dir():
        if not is_dcp_checkpoint(path):
            found = find_latest(path) or find_latest(confined(checkpoint_dir(path), path))
            if found is None:
                raise CheckpointError(f"{path}: a directory without step_*.pt / step_*.dcp checkpoints; "
                                      "pass a checkpoint file or a run directory")
            path = found
    config = None
    if is_dcp_checkpoint(path):
        state = _read_dcp_model_state(path)
    else:
        checkpoint = load_checkpoint_file(path)
        state = unwrap_model_state(checkpoint, path)
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                config = (f.metadata() or {}).get("config")
        elif isinstance(checkpoint.get("config"), dict):
            config = checkpoint["config"]
    return map_albef_keys(state), config


def _read_dcp_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state of a `.dcp` checkpoint, read in this one process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not _is_complete(path):
        raise CheckpointError(f"{path}: incomplete .dcp checkpoint (no {_DCP_METADATA} or {DCP_TRAINER_STATE})")
    check_dcp_directory(path)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            loaded = _load_state_dict_from_keys(keys={"model"}, storage_reader=_SafeDCPReader(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the model shards ({type(err).__name__}: "
                              f"{first_line(err)})") from err
    return unwrap_model_state(loaded, path)


def load_pretrained(model: torch.nn.Module, path: str | os.PathLike, skip: Iterable[str] = (), *,
                    unused: Iterable[str] = (), new: Iterable[str] = ()) -> LoadReport:
    """Load our checkpoint (`.pt` or `.dcp`), a released ALBEF .pth or a plain state dict into
    `model`. Every key is accounted for (see `match_state_dict`); the returned report says how.
    """
    return load_weights(model, read_model_state(path), str(path), unused=unused, new=new, skip=skip)


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike,
                    config: dict[str, Any] | None = None) -> Path:
    """Export `model` weights (and optionally its config) atomically.

    `.safetensors`: the state dict without tied aliases (restored by `load_pretrained`), config
    as JSON metadata. Otherwise a torch file `{'model': state_dict, 'config': config}`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if path.suffix == ".safetensors":
        aliases = {k for g in _tied_groups(state) for k in g[1:]}
        tensors = {k: v.contiguous() for k, v in state.items() if k not in aliases}
        metadata = {"config": json.dumps(config)} if config is not None else None
        _atomic_write(path, lambda f: f.write(safetensors_bytes(tensors, metadata)))
    else:
        payload = {"model": state} if config is None else {"model": state, "config": config}
        _atomic_write(path, lambda f: torch.save(payload, f))
    return path
