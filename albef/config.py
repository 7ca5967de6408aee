"""Typed configuration: dataclass schema, YAML loading with `base:` inheritance and
`key.sub=value` overrides, strict validation with one-line `ConfigError` messages.

Defaults reproduce ALBEF 4M pretraining (see configs/pretrain.yaml for the knobs explained).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from albef.registry import sections as task_sections

__all__ = ["Config", "ConfigError", "load_config", "save_config", "check_paths", "config_error",
           "parse_yaml", "read_json"]


class ConfigError(ValueError):
    """A user error in a config file, override or dict; str() is a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class VisionConfig:
    arch: str = "deit_base_patch16_224"
    image_size: int = 256
    pretrained: bool = True  # timm's weights for `arch` (ALBEF starts from DeiT-B/16)
    checkpoint: str | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False


@dataclass
class TextConfig:
    bert: str = "bert-base-uncased"
    pretrained: bool = True
    tokenizer: str | None = None
    fusion_layer: int = 6
    attention: Literal["sdpa", "eager"] = "sdpa"
    grad_checkpointing: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    embed_dim: int = 256
    temp: float = 0.07
    momentum: float = 0.995
    queue_size: int = 65536
    distill: bool = True  # momentum distillation (ALBEF's `distill`); false: no momentum targets
    init_checkpoint: str | None = None  # weights to start from (`--init-from`): ours or released ALBEF
    init_queues: Literal["keep", "fresh"] = "keep"  # keep: take the checkpoint's feature queues (ALBEF)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class LossWeights:
    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0


@dataclass
class LossConfig:
    itc: Literal["ce", "kl"] = "ce"
    weights: LossWeights = field(default_factory=LossWeights)
    alpha: float = 0.4
    alpha_warmup: bool = True
    mlm_probability: float = 0.15
    mlm_mask_sep: bool = True  # ALBEF masks [SEP] like any word (never [PAD], [CLS])
    itc_gather_batch: bool = False
    itm_negatives: Literal["local", "global"] = "local"
    same_id_positives: bool = False  # ITC positives: false = the pair only (ALBEF pretraining),
    #                                  true = every caption of the same image (ALBEF retrieval)


@dataclass
class DataConfig:
    format: Literal["json", "wds"] = "json"
    train_files: list[str] = field(default_factory=lambda: [
        "data/coco.json", "data/vg.json", "data/cc3m_train.json", "data/cc3m_val.json",
        "data/sbu.json"])
    image_root: str = ""
    shards: str | None = None
    num_samples: int | None = None
    max_words: int = 30
    max_tokens: int = 25
    pad_to_max_tokens: bool = False  # pad every batch to max_tokens (static shapes)
    num_workers: int = 4
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    randaugment: bool = True
    hflip: bool = True  # random horizontal flip (off when captions say left/right)
    max_bad_fraction: float = 0.01
    caption_list: Literal["random", "expand"] = "random"  # ALBEF: one caption drawn per access
    jpeg_draft: bool = False  # decode large JPEGs at 1/2..1/8 scale where every crop stays >= image_size
    # where training images are decoded and augmented: 'workers' (PIL in the DataLoader workers, as
    # ALBEF) or 'device' (JPEG bytes to the training device: nvJPEG + tensor transforms on CUDA)
    decode: Literal["workers", "device"] = "workers"


@dataclass
class TrainConfig:
    batch_size: int = 64
    epochs: int = 30
    grad_accum: int = 1
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    clip_grad: float | None = None
    max_steps: int | None = None
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 3
    max_nonfinite: int = 10
    strategy: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False  # torch.compile each ViT block and BERT layer
    async_checkpoint: bool = True  # stage to CPU, write the file in a background thread (same file)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_lr: float = 1e-5
    warmup_steps: int = 2000
    warmup_across_epochs: bool = False  # ALBEF: the warmup ends with epoch 0
    min_lr: float = 1e-5


@dataclass
class EvalConfig:
    val_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    image_root: str = ""
    max_tokens: int = 30  # captions are tokenised to this length for evaluation (ALBEF: 30)
    batch_size: int = 64
    k_test: int = 256
    num_workers: int = 4
    save_examples: int = 0  # retrieval: picture grids of this many text and image queries (--save-examples)


@dataclass
class Config:
    output_dir: str = "runs/pretrain"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # + one section per registered task that owns one (`cfg.vqa`, `cfg.grounding`, ...): each task
    # module declares its dataclass and registers it (albef/registry.py); a Config has them all.

    def __post_init__(self) -> None:
        for name, section in task_sections().items():
            if not hasattr(self, name):
                setattr(self, name, section.cls())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML / checkpoint friendly), task sections included."""
        data = dataclasses.asdict(self)
        data.update({name: dataclasses.asdict(getattr(self, name)) for name in task_sections()})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Config:
        """Build and validate a Config from plain data (e.g. a checkpoint's stored config)."""
        return _build_config(data, _Origins(source))


# ----------------------------------------------------------------------------- validation

class _Origins:
    """Remembers which file or override set each dotted key, to name it in errors."""

    def __init__(self, default: str):
        self.default, self.where = default, {}

    def mark(self, key: str, value: Any, source: str) -> None:
        self.where[key] = source
        if isinstance(value, dict):
            for k, v in value.items():
                self.mark(f"{key}.{k}", v, source)

    def error(self, key: str, message: str) -> ConfigError:
        path = re.sub(r"\[\d+\]", "", key)
        while path and path not in self.where:
            path = path.rpartition(".")[0]
        return ConfigError(f"{self.where.get(path, self.default)}: {key}: {message}")


def config_error(cfg: Any, key: str, message: str) -> ConfigError:
    """The one-line ConfigError for `key` of `cfg`, naming the file or override that set it."""
    return getattr(cfg, "_origins", _Origins("<config>")).error(key, message)


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if get_origin(tp) else tp.__name__


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(tp: Any, value: Any, key: str, origins: _Origins) -> Any:
    """Check `value` against the annotation `tp`; returns the (lightly converted) value."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, origins)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key, origins)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise origins.error(key, f"expected one of {allowed} (got {_show(value)})")
        return value
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(args[0], v, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return copy.deepcopy(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise origins.error(key, f"expected a finite number (got {_show(value)})")
            return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise origins.error(key, f"expected {_type_name(tp)} (got {_show(value)})")


def describe_fields(cls: type, prefix: str = "", ranges: dict[str, str] | None = None) -> list[str]:
    """One line per field of dataclass `cls`: 'prefix.name: type = default [range]' (--help)."""
    lines = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        allowed = f"  in {ranges[f.name]}" if ranges and f.name in ranges else ""
        lines.append(f"{prefix}{f.name}: {_type_name(hints[f.name])} = {_show(default)}{allowed}")
    return lines


def _nearest(key: str, prefix: str, cls: type) -> str:
    """' (did you mean ...?)' hint for an unknown key, searching its section, then anywhere."""
    names = list(_hints(cls))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    elsewhere = [p for p in _all_keys(Config) if p.rpartition(".")[2] == key]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    return f" (valid keys: {', '.join(names)})"


def _hints(cls: type) -> dict[str, Any]:
    """The typed fields of dataclass `cls`; for Config, the registered task sections too."""
    hints = get_type_hints(cls)
    if cls is Config:
        hints.update({name: section.cls for name, section in task_sections().items()})
    return hints


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
    return keys


def _build(cls: type, data: Any, key: str, origins: _Origins) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise origins.error(key or "<top level>", f"expected a mapping (got {_show(data)})")
    prefix = f"{key}." if key else ""
    hints = _hints(cls)
    for name in data:
        if name not in hints:
            hint = _nearest(str(name), prefix, cls)
            raise origins.error(f"{prefix}{name}", f"unknown key{hint}")
    values = {n: _coerce(hints[n], v, prefix + n, origins) for n, v in data.items()}
    if cls is not Config:
        return cls(**values)
    sections = task_sections()
    cfg = cls(**{n: v for n, v in values.items() if n not in sections})
    for name in sections.keys() & values.keys():
        setattr(cfg, name, values[name])
    return cfg


# Allowed ranges, "[" / "]" inclusive, "(" / ")" exclusive; null optionals are not checked and
# lists are checked element-wise.
_RANGES = {
    # model sizes have a stated maximum (far above ViT-L / bert-large), checked before anything is
    # allocated: a config stored in a downloaded checkpoint cannot ask for absurd tensors
    "seed": "[0, inf)", "model.embed_dim": "[1, 16384]", "model.temp": "[0.001, 0.5]",
    "model.momentum": "[0, 1]", "model.queue_size": "[1, 4194304]",
    "model.vision.image_size": "[1, 8192]", "model.vision.embed_dim": "[1, 16384]",
    "model.vision.depth": "[1, 128]", "model.vision.num_heads": "[1, 256]",
    "model.vision.patch_size": "[1, 1024]", "model.vision.mlp_ratio": "(0, 64]",
    "model.vision.drop_path_rate": "[0, 1)", "model.text.fusion_layer": "[0, inf)",
    "loss.weights.itc": "[0, inf)", "loss.weights.itm": "[0, inf)", "loss.weights.mlm": "[0, inf)",
    "loss.alpha": "[0, 1]", "loss.mlm_probability": "(0, 1)",
    "data.num_samples": "[1, inf)", "data.max_words": "[1, inf)", "data.max_tokens": "[3, inf)",
    "data.num_workers": "[0, inf)", "data.std": "(0, inf)", "data.crop_scale": "(0, 1]",
    "data.max_bad_fraction": "[0, 1]",
    "train.batch_size": "[1, inf)", "train.epochs": "[1, inf)", "train.grad_accum": "[1, inf)",
    "train.clip_grad": "(0, inf)", "train.max_steps": "[1, inf)", "train.log_every": "[1, inf)",
    "train.ckpt_every": "[1, inf)", "train.keep_last": "[1, inf)",
    "train.max_nonfinite": "[1, inf)",
    "optim.lr": "(0, inf)", "optim.weight_decay": "[0, inf)", "optim.betas": "[0, 1)",
    "optim.warmup_lr": "[0, inf)", "optim.warmup_steps": "[0, inf)", "optim.min_lr": "[0, inf)",
    "eval.batch_size": "[1, inf)", "eval.max_tokens": "[3, inf)", "eval.k_test": "[1, inf)", "eval.num_workers": "[0, inf)",
    "eval.save_examples": "[0, inf)",
}  # + each task section's own ranges (its task's `config_ranges`)


def _ranges() -> dict[str, str]:
    ranges = dict(_RANGES)
    for name, section in task_sections().items():
        ranges.update({f"{name}.{key}": interval for key, interval in section.ranges.items()})
    return ranges


MAX_PATCHES = 16384  # image tokens of one image: (image_size / patch_size) ** 2 (ALBEF: 256)


def _range_error(value: Any, interval: str) -> str | None:
    """Requirement text when `value` (a number or list of numbers) is outside `interval`."""
    left, lo, hi, right = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval).groups()
    lo, hi = float(lo), float(hi)
    for x in value if isinstance(value, list) else [value]:
        if x is not None and not ((x >= lo if left == "[" else x > lo)
                                  and (x <= hi if right == "]" else x < hi)):
            bound = f"must be {'>=' if left == '[' else '>'} {lo:g}" if hi == math.inf else \
                f"must be in {interval}"
            return bound if x is value else f"values {bound}"
    return None


def _relations(c: Config) -> list[tuple[str, bool, str]]:
    """(key, ok, requirement) for the constraints between values."""
    v, t, d = c.model.vision, c.model.text, c.data
    layers = t.config_overrides.get("num_hidden_layers")
    return [
        ("output_dir", bool(c.output_dir), "must not be empty"),
        ("model.vision.patch_size", not v.patch_size or v.image_size % v.patch_size == 0,
         f"must divide model.vision.image_size ({v.image_size})"),
        ("model.vision.patch_size", not v.patch_size or (v.image_size // v.patch_size) ** 2 <= MAX_PATCHES,
         f"must leave at most {MAX_PATCHES} patches of a model.vision.image_size ({v.image_size}) image"),
        ("model.vision.num_heads", not (v.embed_dim and v.num_heads)
         or v.embed_dim % v.num_heads == 0, f"must divide model.vision.embed_dim ({v.embed_dim})"),
        ("model.text.fusion_layer", not isinstance(layers, int) or t.fusion_layer <= layers,
         f"must be <= model.text.config_overrides.num_hidden_layers ({layers})"),
        ("loss.weights", max(dataclasses.astuple(c.loss.weights)) > 0,
         "at least one must be > 0"),
        ("data.train_files", d.format != "json" or bool(d.train_files),
         "must list at least one annotation file when data.format is 'json'"),
        ("data.shards", d.format != "wds" or bool(d.shards),
         "must be a shard url pattern when data.format is 'wds'"),
        ("data.num_samples", d.format != "wds" or d.num_samples is not None,
         "must give the samples per epoch when data.format is 'wds'"),
        ("data.mean", len(d.mean) == 3, "must have 3 values (R, G, B)"),
        ("data.std", len(d.std) == 3, "must have 3 values (R, G, B)"),
        ("data.crop_scale", len(d.crop_scale) == 2 and d.crop_scale[0] <= d.crop_scale[-1],
         "must be [min, max] with min <= max"),
        ("optim.betas", len(c.optim.betas) == 2, "must be [beta1, beta2]"),
        ("optim.min_lr", c.optim.min_lr <= c.optim.lr, f"must be <= optim.lr ({c.optim.lr:g})"),
    ]


def _build_config(data: Any, origins: _Origins) -> Config:
    cfg = _build(Config, data, "", origins)
    problems = [(k, _range_error(_lookup(cfg, k), r)) for k, r in _ranges().items()]
    problems += [(k, None if ok else req) for k, ok, req in _relations(cfg)]
    for key, requirement in problems:
        if requirement:
            raise origins.error(key, f"{requirement} (got {_show(_lookup(cfg, key))})")
    cfg._origins = origins  # lets check_paths name the file that set a missing path
    return cfg


def _lookup(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


# ----------------------------------------------------------------------------- loading

def _read_yaml(path: str, included_by: str | None) -> dict[str, Any]:
    where = f"{included_by}: base" if included_by else path
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: config file not found: '{path}'")
    with open(path, encoding="utf-8") as f:
        data = parse_yaml(f, path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (got {_show(data)})")
    return data


def parse_yaml(text: Any, source: str) -> Any:
    """`yaml.safe_load` of `text` (a string or open file) read from `source`: any YAML problem,
    a Python tag (`!!python/object`, refused by safe_load, nothing runs) included, is one-line
    ConfigError naming `source`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        kind = "unsupported YAML tag (only plain data is read)" if isinstance(e, yaml.constructor.ConstructorError) \
            else "YAML syntax error"
        raise ConfigError(f"{source}: {kind}{at}: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not a UTF-8 text file ({e.reason})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The data of a JSON file a user may have downloaded: not found, unreadable, not UTF-8 or
    not JSON is one-line ConfigError naming the file (JSON holds data only: nothing runs)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def _merge(dst: dict, src: dict, origins: _Origins, source: str, prefix: str = "") -> None:
    """Recursive merge: mappings merge key by key, everything else is replaced."""
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            origins.where[key] = source
            _merge(dst[k], v, origins, source, key + ".")
        else:
            dst[k] = copy.deepcopy(v)
            origins.mark(key, v, source)


def _file_chain(path: str) -> list[tuple[str, dict]]:
    """[(file, data)] from the root `base:` down to `path`."""
    chain, seen, included_by = [], set(), None
    while path is not None:
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"{included_by}: base: inheritance cycle through '{path}'")
        seen.add(real)
        data = _read_yaml(path, included_by)
        base = data.pop("base", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a file path (got {_show(base)})")
        chain.append((path, data))
        included_by, path = path, os.path.join(os.path.dirname(path), base) if base else None
    return chain[::-1]


def _parse_override(item: str) -> dict[str, Any]:
    """'a.b=value' -> {'a': {'b': value}}, the value parsed as YAML."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"override '{item}': expected key.sub=value, e.g. train.batch_size=8")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML: "
                          f"{getattr(e, 'problem', None) or e}") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (with its `base:` chain), apply `key.sub=value` overrides, validate."""
    data: dict[str, Any] = {}
    origins = _Origins(path or "<defaults>")
    for file, file_data in _file_chain(path) if path else []:
        _merge(data, file_data, origins, file)
    for item in overrides:
        _merge(data, _parse_override(item), origins, f"override '{item}'")
    return _build_config(data, origins)


def save_config(cfg: Config, path: str) -> None:
    """Write the fully resolved config as YAML (loadable again with load_config)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- filesystem

def _looks_like_path(name: str) -> bool:
    """Local path rather than a hub id ('bert-base-uncased', 'org/name')?"""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])


def check_paths(cfg: Config, training: bool = True) -> None:
    """Checks that need the environment: the files the config names exist (relative to the
    working directory; the training data only when `training`) and model.text.config_overrides
    are BertConfig fields."""
    origins = getattr(cfg, "_origins", _Origins("<config>"))
    cwd = os.getcwd()

    def need(key: str, path: str, kind: str = "file") -> None:
        exists = os.path.isdir(path) if kind == "directory" else os.path.exists(path)
        if not exists:
            raise origins.error(key, f"{kind} not found: '{path}' (relative to {cwd})")

    if training and cfg.data.format == "json":
        for i, file in enumerate(cfg.data.train_files):
            need(f"data.train_files[{i}]", file)
        if cfg.data.image_root:
            need("data.image_root", cfg.data.image_root, "directory")
    for split in ("val_files", "test_files"):
        for i, file in enumerate(getattr(cfg.eval, split)):
            need(f"eval.{split}[{i}]", file)
    if (cfg.eval.val_files or cfg.eval.test_files) and cfg.eval.image_root:
        need("eval.image_root", cfg.eval.image_root, "directory")
    if cfg.model.init_checkpoint and not cfg.model.init_checkpoint.startswith("hf-hub:"):  # albef.hub resolves those
        need("model.init_checkpoint", cfg.model.init_checkpoint, "file or directory")
    if cfg.model.vision.checkpoint:
        need("model.vision.checkpoint", cfg.model.vision.checkpoint)
    text = cfg.model.text
    for key, name in (("model.text.bert", text.bert), ("model.text.tokenizer", text.tokenizer)):
        if name and _looks_like_path(name):
            need(key, os.path.expanduser(name), "directory")
    fields = _bert_fields() if text.config_overrides else []
    for name in text.config_overrides:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            key = f"model.text.config_overrides.{name}"
            raise origins.error(key, f"not a BertConfig field{hint}")


def _bert_fields() -> list[str]:
    from transformers import BertConfig  # slow import: only when overrides are given

    return list(BertConfig().to_dict())


def check_worker_decode(cfg: Config, task: str) -> None:
    """For tasks whose datasets decode in the workers only: data.decode=device is a ConfigError."""
    if cfg.data.decode != "workers":
        origins = getattr(cfg, "_origins", _Origins("<config>"))
        raise origins.error("data.decode", f"{task} decodes its training images in the DataLoader workers only "
                                           f"(data.decode=device serves the image-caption tasks: pretrain, "
                                           f"retrieval, grounding); set data.decode=workers")


