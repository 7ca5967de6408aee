"""The exported-folder format (`albef export`) and its safe reader, and `hf-hub:` name resolution.

Checkpoint I/O (albef/checkpoint.py) and `albef.load` read exported folders and Hub names through
`read_export`; writing them and pushing to the Hub is albef/hub.py. An exported folder holds
exactly `EXPECTED_FILES`; reading one runs nothing stored in it: the folder must hold only those
files (a stray .bin/.pkl/.py refuses it), the safetensors header is checked against the file
before safetensors reads it, YAML and JSON are parsed as data. Every refusal is one line naming
the file (CheckpointError).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml

import albef
from albef.weights import CheckpointError

__all__ = ["HUB_PREFIX", "EXPECTED_FILES", "is_hub_name", "is_export_dir", "resolve_hub_name", "check_export_dir",
           "check_safetensors_header", "read_export"]

HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
TEXT_DIR = "bert"  # BERT config and tokenizer files of the text encoder
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
HUB_FILES = (".gitattributes",)  # what the Hub adds to every repository it creates
EXPECTED_FILES = frozenset({WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, *HUB_FILES, *(f"{TEXT_DIR}/{n}" for n in TEXT_FILES)})
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, f"{TEXT_DIR}/config.json", f"{TEXT_DIR}/tokenizer_config.json")
TIED_META = "albef.tied"  # safetensors metadata: {alias key: key holding the tensor} (tied weights stored once)
MOMENTUM_META = "albef.momentum_from"  # {momentum module: online module} left out, rebuilt as copies on read
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


# ----------------------------------------------------------------------------- reading


def is_hub_name(path: Any) -> bool:
    """`hf-hub:org/name[@revision]`?"""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def is_export_dir(path: Any) -> bool:
    """A folder written by `albef export` (it has model.safetensors), whatever else it holds."""
    if is_hub_name(path):
        return False
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS_FILE).exists()


def _hub_cache_dir() -> str | None:
    """The Hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _parse_hub_name(name: str) -> tuple[str, str | None]:
    repo_id, _, revision = name[len(HUB_PREFIX):].partition("@")
    if not REPO_ID.fullmatch(repo_id) or (revision == "" and name.endswith("@")):
        raise CheckpointError(f"{name}: not a Hub model name; write hf-hub:org/name or hf-hub:org/name@revision")
    return repo_id, revision or None


def resolve_hub_name(name: str) -> Path:
    """The local folder of `hf-hub:org/name[@revision]`: `snapshot_download` into the Hub cache
    (only the cache when HF_HUB_OFFLINE is set). Nothing in it is read here."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = _parse_hub_name(name)
    offline = hub_offline()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=_hub_cache_dir(), local_files_only=offline,
                                   library_name="albef", library_version=albef.__version__)
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no such Hub repository (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{name}: the repository has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        where = _hub_cache_dir() or "the default Hub cache"
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise CheckpointError(f"{name}: not in the Hub cache ({where}) and {why}; download it once with network "
                              "access, or point HF_HUB_CACHE at a cache that holds it") from None
    except Exception as err:  # network, permission and cache errors come in many types
        raise CheckpointError(f"{name}: cannot download from the Hugging Face Hub "
                              f"({type(err).__name__}: {first_line(err)})") from None
    return Path(folder)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _allowed_root(folder: Path) -> Path:
    """Where the files of `folder` may really live: the folder, or for a Hub cache snapshot
    (`models--org--name/snapshots/<sha>`, files linked to `../../blobs`) the repository's cache."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def check_export_dir(folder: str | os.PathLike) -> None:
    """Refuse (CheckpointError, one line) a folder that holds anything but `EXPECTED_FILES`
    (e.g. a stray pickle or .py), lacks one of `REQUIRED_FILES`, or links outside itself."""
    folder = Path(folder)
    root = _allowed_root(folder)
    unexpected, outside = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in sorted(dirnames):
            rel = (here / name).relative_to(folder).as_posix()
            if rel != TEXT_DIR or (here / name).is_symlink():
                unexpected.append(rel + "/")
        dirnames[:] = [d for d in dirnames if (here / d).relative_to(folder).as_posix() == TEXT_DIR
                       and not (here / d).is_symlink()]
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if rel not in EXPECTED_FILES or not path.is_file():
                unexpected.append(rel)
            elif not path.resolve().is_relative_to(root):
                outside.append(rel)
    if unexpected:
        raise CheckpointError(
            f"{folder}: refused to load: unexpected files in an exported albef folder: {', '.join(sorted(unexpected))} "
            f"(it may hold only {', '.join(sorted(EXPECTED_FILES))}); nothing was read, re-export it with `albef export`")
    if outside:
        raise CheckpointError(f"{folder}: refused to load: {', '.join(outside)} link(s) outside the folder")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: incomplete exported albef folder: no {', '.join(missing)}; "
                              "re-export it with `albef export`")


def check_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a .safetensors file, checked against the file before any tensor is
    read: known dtypes, non-negative integer shapes, each tensor's byte range exactly its
    shape's size, the ranges contiguous from 0 to the end of the file. CheckpointError (one
    line) when the header lies."""
    path = Path(path)

    def lie(detail: str) -> CheckpointError:
        return CheckpointError(f"{path}: refused to load: the safetensors header does not describe the file "
                               f"({detail}); re-export the weights with `albef export`")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise lie(f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise lie(f"header length {length} exceeds the {size}-byte file")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise lie(f"header is not JSON: {first_line(err)}") from None
    if not isinstance(header, dict):
        raise lie(f"header is a {type(header).__name__}, not a mapping")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise lie("__metadata__ is not a mapping of strings")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise lie(f"tensor {key!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise lie(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise lie(f"tensor {key!r} has shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise lie(f"tensor {key!r} has data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise lie(f"tensor {key!r}: {dtype} {shape} needs {math.prod(shape) * _DTYPE_BYTES[dtype]} bytes, "
                      f"data_offsets give {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise lie(f"tensor {key!r} starts at byte {begin}, not {end} (overlapping or gapped data)")
        end = stop
    if end != size - 8 - length:
        raise lie(f"the tensors end at byte {end} of a {size - 8 - length}-byte data section")
    return header


def _json_meta(path: Path, metadata: dict[str, str], key: str) -> dict[str, str]:
    if key not in metadata:
        return {}
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata {key} is not JSON ({first_line(err)})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CheckpointError(f"{path}: metadata {key} is not a mapping of names")
    return value


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors with the tied aliases and left-out momentum copies restored, so that the
    state has the keys of the model that was exported (queues aside, when they were left out)."""
    from safetensors.torch import load_file

    metadata = check_safetensors_header(path).get("__metadata__", {})
    try:
        state = load_file(path)
    except Exception as err:  # safetensors checks again; its errors come in several types
        raise CheckpointError(f"{path}: cannot read the weights ({type(err).__name__}: {first_line(err)})") from None
    for alias, source in _json_meta(path, metadata, TIED_META).items():
        if alias in state or source not in state:
            raise CheckpointError(f"{path}: metadata {TIED_META} ties {alias} to {source}, which the file "
                                  f"{'already holds' if alias in state else 'lacks'}")
        state[alias] = state[source]
    for momentum, online in _json_meta(path, metadata, MOMENTUM_META).items():
        prefix = f"{online}."
        copies = {f"{momentum}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)}
        if not copies or any(k in state for k in copies):
            raise CheckpointError(f"{path}: metadata {MOMENTUM_META} names {momentum} from {online}, which does not "
                                  "fit the tensors in the file")
        state.update(copies)  # as at the start of ALBEF training: momentum = online
    return state


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise CheckpointError(f"{path}: not a readable YAML config{at}: {problem}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of config sections, found a {type(data).__name__}")
    return data


def _check_json(path: Path) -> None:
    if path.is_file():
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({first_line(err)})") from None


def read_export(path: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(folder, model state, config dict) of an exported folder or `hf-hub:` name. The folder is
    checked (`check_export_dir`) before anything in it is read; the config's model.text.bert
    names the folder's own bert/ (BERT config and tokenizer), so building the model downloads
    nothing."""
    folder = resolve_hub_name(path) if is_hub_name(path) else Path(path)
    check_export_dir(folder)
    for name in TEXT_FILES:
        if name.endswith(".json"):
            _check_json(folder / TEXT_DIR / name)
    config = _read_yaml(folder / CONFIG_FILE)
    text = config.setdefault("model", {}).setdefault("text", {}) if isinstance(config.get("model", {}), dict) else None
    if not isinstance(text, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE}: model.text is not a mapping")
    text["bert"], text["tokenizer"] = str(folder / TEXT_DIR), None
    return folder, _read_weights(folder / WEIGHTS_FILE), config


# ----------------------------------------------------------------------------- exporting
