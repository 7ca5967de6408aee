"""Weight adaptation: matching a weight file's state dict to a model under the one loader
policy (`match_state_dict`, `load_weights`), its `LoadReport`, position-embedding resampling,
the released-ALBEF key rename (`map_albef_keys`) and `WeightAdapter`, the base of the adapters
each model family keeps beside its model (albef/models/*.py: the keys it declares unused or
new, and its key rules).

Pure functions of tensors: nothing here reads or writes files (that is albef/checkpoint.py,
which re-exports these names for its older callers).
"""
from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

__all__ = [
    "CheckpointError", "LoadReport", "WeightAdapter", "group_keys", "map_albef_keys", "match_state_dict",
    "load_weights", "resample_pos_embed",
]

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


# ----------------------------------------------------------------------------- matching


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


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *,
                 unused: Iterable[str] = (), new: Iterable[str] = (), skip: Iterable[str] = ()
                 ) -> LoadReport:
    """Load `state` into `model` under the one policy of `match_state_dict`; returns the report."""
    final, report = match_state_dict(state, model.state_dict(), skip, source=source, unused=unused, new=new)
    model.load_state_dict(final, strict=True)
    return report



class WeightAdapter:
    """How one model family takes a weight file's state dict (our key names, i.e. after
    `map_albef_keys`), as timm's `checkpoint_filter_fn` and torchtitan's `state_dict_adapter`:
    `unused` names file keys the model has no place for (dropped, reported as skipped), `new`
    the model keys a file may lack (kept at their initialisation, reported as new); both are
    fnmatch patterns or module prefixes (`match_state_dict`). A family with key rules (renames,
    copies) subclasses it and overrides `adapt`. Each model module keeps its family's adapter
    beside the model; a task names the adapter it loads `--init-from` files with."""

    def __init__(self, name: str, unused: Iterable[str] = (), new: Iterable[str] = ()) -> None:
        self.name, self.unused, self.new = name, tuple(unused), tuple(new)

    def adapt(self, model: torch.nn.Module, state: dict[str, torch.Tensor], source: str
              ) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
        """(the state in the model's layout, unused patterns, new patterns, report notes).
        Raise CheckpointError naming `source` for a file this family cannot start from."""
        return state, list(self.unused), list(self.new), []

    def load(self, model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
        """Adapt `state` and load it into `model` (`load_weights`); returns the report."""
        state, unused, new, notes = self.adapt(model, state, source)
        report = load_weights(model, state, source, unused=unused, new=new)
        report.notes += notes
        return report

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
