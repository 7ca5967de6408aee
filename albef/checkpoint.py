"""Checkpoint files: safe loading, atomic saving with keep-last-K, resume lookup, and loading
pretrained weights (our checkpoints, the released ALBEF .pth files, plain state dicts).

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
import fnmatch
import io
import json
import os
import pickle
import re
import shutil
import socket
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from timm.layers import resample_abs_pos_embed
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

__all__ = [
    "CheckpointError", "LoadReport", "load_checkpoint_file", "save_checkpoint", "find_latest",
    "checkpoint_dir", "best_checkpoint", "run_weights", "resolve_resume", "map_albef_keys", "match_state_dict", "load_pretrained",
    "save_pretrained", "tmp_checkpoint_dir", "publish_checkpoint_dir", "is_dcp_checkpoint",
    "DCP_TRAINER_STATE", "resample_pos_embed", "load_training_state", "check_dcp_directory",
    "load_dcp_state", "checkpoint_step", "read_model_state", "load_weights", "confined",
]

LATEST = "latest"
_STEP_RE = re.compile(r"step_(\d+)\.(?:pt|dcp)")
_TMP_RE = re.compile(r"\.(?:step_\d+\.(?:pt|dcp(?:\.old)?)|latest)\.(?P<host>.+)\.(?P<pid>\d+)\.tmp")
DCP_TRAINER_STATE = "trainer_state.pt"  # rank 0's non-tensor state inside a .dcp directory
_DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint once every shard is saved

# ALBEF retrieval/VQA checkpoints hold the text encoder as a BertModel (no `.bert.`, no MLM head).
_BERT_MODEL_RE = re.compile(r"^(text_encoder(?:_m)?)\.(embeddings|encoder)\.")
# Keys a checkpoint may carry that hold no information of their own: {alias suffix: source suffix}.
_TIED_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
_POSITION_IDS = "embeddings.position_ids"  # HF BERT buffer, recomputable
_QUEUES = ("image_queue", "text_queue", "idx_queue")
_QUEUE_STATE = (*_QUEUES, "queue_ptr")
_MAX_SHOWN = 5  # shape mismatches named in an error
_SHAPE_FIX = "check model.embed_dim / model.vision / model.text sizes in the config"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written or matched to the model; names the file."""


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
                              f"corrupt ({type(err).__name__}: {_first_line(err)})") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found a {type(obj).__name__}")
    return obj


def _refused(path: Path | str, what: str = "") -> str:
    return (f"{path}: refused to load{what}: it contains code or objects that are not plain tensors "
            "(numbers, strings, lists, dicts), which will not be executed; re-save the weights "
            "as a plain state dict or .safetensors from a trusted source")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


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
        raise CheckpointError(f"{_refused(file)} ({_first_line(err)})") from None
    except Exception as err:  # truncated or damaged pickles fail in many ways
        raise CheckpointError(f"{file}: cannot read DCP metadata, the file is truncated or corrupt "
                              f"({type(err).__name__}: {_first_line(err)})") from None
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
                              f"({type(err).__name__}: {_first_line(err)})") from None


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
            raise CheckpointError(f"{path}: cannot load ({_first_line(err)})") from err
        raise first from None



# ----------------------------------------------------------------------------- pretrained


@dataclass
class LoadReport:
    """How every key of a checkpoint and of the model was accounted for."""

    source: str
    loaded: list[str] = field(default_factory=list)         # values taken from the checkpoint
    resampled: list[str] = field(default_factory=list)      # loaded after resampling (pos_embed)
    reinitialised: list[str] = field(default_factory=list)  # in both, model's fresh value kept
    missing: list[str] = field(default_factory=list)        # model keys the file lacks (allowed)
    unexpected: list[str] = field(default_factory=list)     # file keys the model lacks (ignored)
    skipped: list[str] = field(default_factory=list)        # file keys declared unused by the task
    new: list[str] = field(default_factory=list)            # model keys declared new: fresh init kept
    notes: list[str] = field(default_factory=list)

    # The groups `details` lists key by key (`loaded` is a count there, resampled keys included).
    GROUPS = ("resampled", "new", "reinitialised", "skipped", "missing", "unexpected")

    def duplicates(self) -> list[str]:
        """Keys listed in more than one group (the one vocabulary: each key in exactly one)."""
        seen: dict[str, int] = {}
        for group in self.GROUPS:
            for key in set(getattr(self, group)):
                seen[key] = seen.get(key, 0) + 1
        return sorted(k for k, n in seen.items() if n > 1)

    def __str__(self) -> str:
        counts = ", ".join(f"{len(getattr(self, n))} {n}" for n in (
            "loaded", "resampled", "reinitialised", "new", "missing", "unexpected", "skipped"))
        return "; ".join([f"{self.source}: {counts}", *self.notes])

    def details(self) -> list[str]:
        """The summary line, then one line per kind of key that did not simply load, with the
        keys grouped by module (`text_encoder.cls.* (9)`), for users to read."""
        lines = [f"loaded {self.source}: {len(self.loaded)} tensors"]
        for label, keys in (("resampled", self.resampled), ("freshly initialised (new)", self.new),
                            ("re-initialised", self.reinitialised), ("skipped (unused)", self.skipped),
                            ("not in the file (tied or recomputable)", self.missing),
                            ("ignored (aliases, buffers)", self.unexpected)):
            if keys:
                lines.append(f"  {label}: {', '.join(group_keys(keys))}")
        lines += [f"  note: {note}" for note in self.notes]
        return lines

    def print(self, file: Any = None) -> None:
        """Show the report where users see it (stderr by default); only the first rank prints."""
        if int(os.environ.get("RANK", "0")) == 0:
            print("\n".join(self.details()), file=file or sys.stderr, flush=True)


def group_keys(keys: Iterable[str], depth: int = 3) -> list[str]:
    """Keys grouped by their first `depth` name parts: ['visual_encoder.blocks.0.* (12)', 'temp']."""
    groups: dict[str, int] = {}
    for key in sorted(keys):
        parts = key.split(".")
        name = key if len(parts) <= depth else ".".join(parts[:depth]) + ".*"
        groups[name] = groups.get(name, 0) + 1
    return [name if count == 1 and not name.endswith("*") else f"{name} ({count})"
            for name, count in groups.items()]


def map_albef_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename released-ALBEF keys to ours (`text_encoder.encoder.*` -> `...bert.encoder.*`)."""
    return {_BERT_MODEL_RE.sub(r"\1.bert.\2.", k): v for k, v in state.items()}


def _matches(key: str, patterns: list[str]) -> bool:
    """fnmatch pattern, or a module prefix (`text_encoder.cls` matches its sub-keys)."""
    return any(fnmatch.fnmatchcase(key, p) or key.startswith(p.rstrip(".") + ".")
               for p in patterns)


def _tied_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names sharing one tensor (tied weights), in state-dict order; meta tensors have no data."""
    groups: dict[tuple, list[str]] = {}
    for key, t in state.items():
        if not t.is_meta and t.numel():
            groups.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def _alias_source(key: str) -> str | None:
    for alias, source in _TIED_ALIASES.items():
        if key.endswith(alias):
            return key[: -len(alias)] + source
    return None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors; meta tensors (shape-only matching) have no values to compare."""
    return a.is_meta or b.is_meta or (a.shape == b.shape and torch.equal(a, b))


def _names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(map(str, t.shape))}]"


def _grid(num_patches: int, key: str, source: str) -> list[int]:
    side = round(num_patches ** 0.5)
    if side * side != num_patches:
        raise CheckpointError(f"{source}: {key} has {num_patches} patch positions, not a square "
                              "grid; cannot resample it")
    return [side, side]


def _match_queues(state: dict, target: dict, report: LoadReport) -> None:
    """Queues are training state: if their length differs, keep the model's fresh ones."""
    differs = [k for k in _QUEUES if k in state and k in target
               and state[k].shape[:-1] == target[k].shape[:-1]
               and state[k].shape[-1] != target[k].shape[-1]]
    if differs:
        q_old, q_new = state[differs[0]].shape[-1], target[differs[0]].shape[-1]
        for key in _QUEUE_STATE:
            if key in target:
                state.pop(key, None)
                report.reinitialised.append(key)
        report.notes.append(f"queue size differs (checkpoint {q_old}, model {q_new}): "
                            "queues re-initialised")
    elif ("idx_queue" in target and "idx_queue" not in state and "image_queue" in state
          and "idx_queue" not in report.skipped and "idx_queue" not in report.new):  # else reported there
        report.missing.append("idx_queue")
        report.notes.append("the file has no image-id queue (ALBEF pretraining): initialised empty")


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int] | list[int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a ViT position embedding [1, prefix + n*n, W] to a `grid` of patches, bicubic
    without antialiasing as ALBEF's `interpolate_pos_embed` (fp32 math, dtype kept)."""
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if num_patches == grid[0] * grid[1]:
        return pos_embed
    old = _grid(num_patches, "pos_embed", "position embedding")
    return resample_abs_pos_embed(pos_embed.float(), new_size=list(grid), old_size=old,
                                  num_prefix_tokens=num_prefix_tokens, antialias=False).to(pos_embed.dtype)


def _match_pos_embed(state: dict, target: dict, report: LoadReport) -> None:
    """Resample ViT position embeddings (one class token) to the model's patch grid."""
    for key, want in target.items():
        have = state.get(key)
        if (not key.endswith("pos_embed") or have is None or have.shape == want.shape
                or have.ndim != 3 or have.shape[-1] != want.shape[-1]):
            continue
        old = _grid(have.shape[1] - 1, key, report.source)
        new = _grid(want.shape[1] - 1, key, report.source)
        state[key] = resample_pos_embed(have, new)
        report.resampled.append(key)
        note = f"position embeddings resampled from a {old[0]}x{old[1]} to a {new[0]}x{new[1]} patch grid"
        if note not in report.notes:  # the keys are listed once, under "resampled"
            report.notes.append(note)


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


def match_state_dict(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     skip: Iterable[str] = (), source: str = "checkpoint", *,
                     unused: Iterable[str] = (), new: Iterable[str] = ()
                     ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Match a (key-mapped) checkpoint state dict to the model's `target` state dict: the one
    policy for every weight file (vision init, BERT init, `--init-from`, `load_pretrained`).

    Returns a state dict with exactly the model's keys (ready for a strict load_state_dict)
    and the report. Patterns are fnmatch patterns or module prefixes. `unused` names file keys
    the task does not use (dropped, reported as skipped); `new` names model keys the task adds
    (kept at their fresh initialisation when the file lacks them, reported as new); `skip`
    applies to both sides. Built-in allowances: HF `position_ids` buffers, MLM decoder aliases
    equal to the tensors they are tied to, a missing `idx_queue`, resized queues
    (re-initialised) and pos_embed grids (resampled). Anything else missing, unexpected or of
    another shape raises CheckpointError naming the keys.
    """
    skip, unused, new, report = list(skip), list(unused), list(new), LoadReport(source)
    report.skipped = sorted(k for k in state.keys() | target.keys() if _matches(k, skip))
    report.skipped += sorted(k for k in state.keys() - set(report.skipped) if _matches(k, unused))
    state = {k: v for k, v in state.items() if k not in report.skipped}
    kept = {k for k in target if k in report.skipped}  # model keys that keep their values
    report.new = sorted(k for k in target.keys() - state.keys() - kept if _matches(k, new))
    kept |= set(report.new)

    _match_queues(state, target, report)
    _match_pos_embed(state, target, report)
    kept |= set(report.reinitialised) | set(report.missing)

    tied = {k: g for g in _tied_groups(target) for k in g}
    missing, unexpected = [], []
    for key in state.keys() - target.keys():
        alias_of = _alias_source(key)
        if key.endswith(_POSITION_IDS) or (
                alias_of in state and _same_values(state[key], state[alias_of])):
            report.unexpected.append(key)
        else:
            unexpected.append(key)
    for key in target.keys() - state.keys() - kept:
        if key.endswith(_POSITION_IDS) or any(k in state for k in tied.get(key, ())):
            report.missing.append(key)
        else:
            missing.append(key)
    if missing or unexpected:
        parts = [f"{what} keys {_names(sorted(keys))}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(
            f"{source} does not match the model: {', '.join(parts)}; {_SHAPE_FIX}, or use a "
            "checkpoint of a model this task can start from")

    common = sorted(state.keys() & target.keys())
    wrong = [k for k in common if state[k].shape != target[k].shape]
    if wrong:
        shown = "; ".join(f"{k}: checkpoint {_shape(state[k])} vs model {_shape(target[k])}"
                          for k in wrong[:_MAX_SHOWN])
        more = f"; and {len(wrong) - _MAX_SHOWN} more" if len(wrong) > _MAX_SHOWN else ""
        raise CheckpointError(f"{source}: {len(wrong)} tensors differ in shape from the model ({shown}{more}); "
                              f"{_SHAPE_FIX}")
    for group in {tuple(g) for g in tied.values()}:
        present = [k for k in group if k in state]
        if any(not _same_values(state[present[0]], state[k]) for k in present[1:]):
            raise CheckpointError(f"{source}: {', '.join(present)} are tied in the model but "
                                  "hold different values in the checkpoint")

    final = dict(target)
    final.update({k: state[k] for k in common})
    for key in report.missing:
        loaded_twin = [k for k in tied.get(key, ()) if k in state]
        if loaded_twin:
            final[key] = state[loaded_twin[0]]
    report.loaded = common
    report.missing.sort()
    report.unexpected.sort()
    return final, report


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
    from albef import hub

    if hub.is_hub_name(path) or hub.is_export_dir(path):
        return hub.read_export(path)[1]
    path = Path(path)
    if path.is_dir():
        if not is_dcp_checkpoint(path):
            found = find_latest(path) or find_latest(confined(checkpoint_dir(path), path))
            if found is None:
                raise CheckpointError(f"{path}: a directory without step_*.pt / step_*.dcp checkpoints; "
                                      "pass a checkpoint file or a run directory")
            path = found
    state = _read_dcp_model_state(path) if is_dcp_checkpoint(path) else \
        unwrap_model_state(load_checkpoint_file(path), path)
    return map_albef_keys(state)


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
                              f"{_first_line(err)})") from err
    return unwrap_model_state(loaded, path)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *,
                 unused: Iterable[str] = (), new: Iterable[str] = (), skip: Iterable[str] = ()
                 ) -> LoadReport:
    """Load `state` into `model` under the one policy of `match_state_dict`; returns the report."""
    final, report = match_state_dict(state, model.state_dict(), skip, source=source, unused=unused, new=new)
    model.load_state_dict(final, strict=True)
    return report


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
