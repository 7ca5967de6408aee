"""Sharing checkpoints: a pickle-free exported folder, the Hugging Face Hub, model cards.

    albef export RUN_DIR_OR_CHECKPOINT OUT_DIR [--with-momentum] [--license mit] [--push org/name]
    albef export ALBEF_4M.pth OUT_DIR --config configs/pretrain.yaml     # released ALBEF weights, once
    albef push RUN_DIR_OR_EXPORTED_DIR org/name [--public]

An exported folder holds exactly these files (`EXPECTED_FILES`):

    model.safetensors      the weights (online ones; --with-momentum adds the momentum copies and queues)
    config.yaml            the resolved config the model is built from
    bert/config.json       the BERT config of the text encoder (before config_overrides)
    bert/tokenizer*.json, bert/vocab.txt   the tokenizer
    README.md              the model card, with the Hub's YAML front matter

`albef.load(...)` and `--init-from` accept such a folder and `hf-hub:org/name[@revision]` (resolved
with `huggingface_hub.snapshot_download`, which honours HF_HUB_OFFLINE and the Hub cache). Reading
one (`read_export`) runs nothing stored in it: the folder must hold only the files above (a stray
.bin/.pkl/.py refuses it), the safetensors header is checked against the file before safetensors
reads it, YAML and JSON are parsed as data. Every refusal is one line naming the file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

import albef
from safetensors.torch import save as safetensors_bytes
from transformers import BertConfig

from albef.checkpoint import (CheckpointError, checkpoint_dir, checkpoint_step, find_latest, is_dcp_checkpoint,
                              load_weights, run_weights)
from albef.config import Config, ConfigError, load_config, save_config
from albef.exported import (CARD_FILE, CONFIG_FILE, EXPECTED_FILES, HUB_PREFIX, MOMENTUM_META, REPO_ID,  # noqa: F401
                            TEXT_DIR, TEXT_FILES, TIED_META, WEIGHTS_FILE, check_export_dir, check_safetensors_header,
                            first_line, hub_offline, is_export_dir, is_hub_name, read_export, resolve_hub_name)
from albef.inference import read_weights_and_config
from albef.models import build_tokenizer
from albef.registry import get_task, tasks
from albef.models.albef import QUEUE_KEYS  # training state, left out with the momentum copies

__all__ = ["HUB_PREFIX", "EXPECTED_FILES", "is_hub_name", "is_export_dir", "resolve_hub_name", "check_export_dir",
           "check_safetensors_header", "read_export", "export", "push", "export_main", "push_main"]

PIPELINE_TAGS = {"pretrain": "zero-shot-image-classification", "retrieval": "zero-shot-image-classification",
                 "grounding": "zero-shot-image-classification", "vqa": "visual-question-answering"}
TASK_TAGS = {"pretrain": "image-text-retrieval", "retrieval": "image-text-retrieval", "grounding": "visual-grounding",
             "ve": "visual-entailment", "nlvr": "nlvr2", "nlvr-pretrain": "nlvr2", "vqa": "visual-question-answering"}


def _momentum_modules(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{momentum module: online module}: every top-level `x_m` with an `x` (ALBEF's naming)."""
    tops = {k.split(".", 1)[0] for k in state}
    return {t: t[:-2] for t in sorted(tops) if t.endswith("_m") and t[:-2] in tops}


def _tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: first key} of the keys that share one tensor (safetensors stores each once)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and ident in first:
            aliases[key] = first[ident]
        else:
            first.setdefault(ident, key)
    return aliases


def infer_task(state: dict[str, torch.Tensor], cfg: Any, results: dict[str, dict]) -> str:
    """The task a state dict was trained for, from its heads (and the grounding metric)."""
    tops = {k.split(".", 1)[0] for k in state}
    if "text_decoder" in tops:
        return "vqa"
    if "ta_head" in tops:
        return "nlvr-pretrain"
    if "cls_head" in tops:
        raise CheckpointError("a classification model (VE or NLVR2): pass --task ve or --task nlvr")
    if any("val_d" in r for r in results.values()):
        return "grounding"
    return "pretrain" if cfg.loss.weights.mlm > 0 else "retrieval"


def _task(name: str):
    """The registered task `name` (albef/registry.py), built."""
    return get_task(name).cls()


def _source_weights(source: Path) -> tuple[Path, Path | None]:
    """(weight file, run directory or None) of a run directory or a weight file."""

    if source.is_dir() and not is_dcp_checkpoint(source):
        weights = run_weights(source)
        if weights is None:
            raise CheckpointError(f"{source}: no best.pt and no step_*.pt / step_*.dcp checkpoint; pass a weight "
                                  "file or a run directory")
        return weights, source
    if not source.exists():
        raise CheckpointError(f"{source}: no such weight file or run directory")
    run = next((d for d in (source.parent, source.parent.parent) if (d / "config.yaml").is_file()), None)
    return source, run


def _results(run: Path | None) -> dict[str, dict]:
    """{file name: metrics} of RUN/results/*.json ({split}_step{N}.json, {split}_latest.json)."""
    found = {}
    for file in sorted((run / "results").glob("*.json")) if run is not None else []:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue  # a damaged result file does not stop an export; the card lists what it read
        if isinstance(data, dict):
            found[file.name] = data
    return found


def _steps(run: Path | None) -> int | None:

    latest = find_latest(checkpoint_dir(run)) if run is not None else None
    return checkpoint_step(latest) if latest is not None else None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _sample_count(file: str) -> str:
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "not readable at export time"
    if not isinstance(data, list):
        return "not a list of samples"
    captions = sum(len(e["caption"]) if isinstance(e, dict) and isinstance(e.get("caption"), list) else 1
                   for e in data)
    return f"{len(data)} samples ({captions} captions)" if captions != len(data) else f"{len(data)} samples"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_rows(results: dict[str, dict], best_metric: str | None) -> list[str]:
    """Markdown rows: the final result of each split, the best val result by the task's metric."""
    by_split: dict[str, list[tuple[int, dict]]] = {}
    for name, data in results.items():
        m = re.fullmatch(r"(\w+?)_step(\d+)\.json", name)
        if m:
            by_split.setdefault(m[1], []).append((int(m[2]), data))
    rows = []
    for split, entries in sorted(by_split.items()):
        entries.sort(key=lambda e: e[0])
        final = entries[-1]
        rows.append(("final", split, *final))
        scored = [e for e in entries if isinstance(e[1].get(best_metric), (int, float))] if best_metric else []
        if split == "val" and scored:  # as best.pt: chosen on val
            best = max(scored, key=lambda e: e[1][best_metric])
            if best[0] == final[0]:
                rows[-1] = (f"final, best ({best_metric})", split, *final)
            else:
                rows.append((f"best ({best_metric})", split, *best))
    lines = []
    for kind, split, step, data in rows:
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in data.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("time_"))
        lines.append(f"| {kind} | {split} | {step} | {numbers} |")
    return lines


def model_card(*, repo_id: str, task: str, cfg: Any, model: torch.nn.Module, exported: dict[str, torch.Tensor],
               with_momentum: bool, source: Path, weights: Path, run: Path | None, results: dict[str, dict], steps: int | None,
               license: str, tags: Sequence[str] = ()) -> str:
    """README.md: Hub front matter, then what the model is, how it was trained, how well it does,
    where it comes from and how to load it."""

    name = repo_id.split("/")[-1]
    origin = f"run directory `{run.name}`, weights `{weights.relative_to(run)}`" if run is not None and \
        weights.is_relative_to(run) else f"`{weights.name}`"
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    front = {"library_name": "albef", "pipeline_tag": PIPELINE_TAGS.get(task, "other"), "license": license,
             "tags": list(dict.fromkeys(["albef", "vision-language", "safetensors", TASK_TAGS[task], *tags]))}
    vit = getattr(model, "visual_encoder", None)
    bert = getattr(getattr(model, "text_encoder", None), "config", None)
    online = sum(p.numel() for k, p in model.state_dict().items() if not k.split(".", 1)[0].endswith("_m")
                 and k not in QUEUE_KEYS)
    arch = [f"- Image encoder: ViT (`{v.arch}` layout), {v.image_size} px images, patch "
            f"{getattr(getattr(vit, 'patch_embed', None), 'patch_size', [v.patch_size])[0]}, width "
            f"{getattr(vit, 'embed_dim', v.embed_dim)}, {len(getattr(vit, 'blocks', []))} blocks"]
    if bert is not None:
        arch.append(f"- Text encoder: BERT, width {bert.hidden_size}, {bert.num_hidden_layers} layers, the last "
                    f"{bert.num_hidden_layers - bert.fusion_layer} fusing the image (cross-attention from layer "
                    f"{bert.fusion_layer}), vocabulary {bert.vocab_size}")
    arch.append(f"- ITC embedding {m.embed_dim}, temperature {m.temp}, momentum {m.momentum}, queue {m.queue_size}; "
                f"{online / 1e6:.2f}M parameters (online)")
    contents = ("online weights, momentum copies and feature queues (for further pretraining)" if with_momentum else
               "online weights; the momentum copies are rebuilt as copies of them when loaded (as at the start of "
               "ALBEF training) and the feature queues start empty")
    start = [f"- `--init-from`: `{m.init_checkpoint}`" if m.init_checkpoint else "- `--init-from`: none"]
    start.append(f"- image encoder: timm `{v.arch}` weights" if v.pretrained else
                 f"- image encoder: `{v.checkpoint}`" if v.checkpoint else "- image encoder: random initialisation")
    start.append(f"- text encoder: BERT `{t.bert}` weights" if t.pretrained else "- text encoder: random initialisation")
    if run is None and not results:
        start = [f"- converted from `{source.name}` (not trained by this framework)"]
    if cfg.data.format == "wds":
        data = [f"- WebDataset shards `{cfg.data.shards}` ({cfg.data.num_samples or 'unknown'} samples)"]
    else:
        data = [f"- `{file}`: {_sample_count(file)}" for file in cfg.data.train_files]
    # best.pt's metric; pretraining keeps no best.pt but logs val retrieval, whose summary is r_mean
    best_metric = getattr(_task(task), "best_metric", None) or (
        "r_mean" if any("r_mean" in r for r in results.values()) else None)
    rows = _metric_rows(results, best_metric)
    metrics = (["| result | split | step | metrics |", "|---|---|---|---|", *rows] if rows else
               ["No evaluation results were recorded with these weights (no results/*.json in the run)."])
    trained = [f"- Steps: {steps}" if steps is not None else "- Steps: not recorded",
               f"- Batch size {cfg.train.batch_size} per GPU, epochs {cfg.train.epochs}"
               + (f" (max_steps {cfg.train.max_steps})" if cfg.train.max_steps else "")
               + f", lr {cfg.optim.lr}, weight decay {cfg.optim.weight_decay}, seed {cfg.seed}"]
    body = [
        f"# {name}", "",
        f"ALBEF ({task}) weights exported by `albef export`: a pickle-free folder (safetensors weights, the resolved "
        "config, the tokenizer) that `albef.load` and `--init-from` read without running any code from it.", "",
        "## Model", "", f"- Task: `{task}`", *arch, f"- `{WEIGHTS_FILE}`: {len(exported)} tensors, {contents}", "",
        "## Training", "", "Starting weights:", *start, "", "Training data:", *data, "", *trained, "",
        "## Results", "", *metrics, "",
        "## Provenance", "", f"- Exported from {origin} by albef {albef.__version__}, commit {_git_commit()}",
        f"- Exported on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
        "## How to load", "", "```python", "import albef", "",
        f'model, preprocess = albef.load("hf-hub:{repo_id}")  # or the path of this folder',
        "sims = model.similarity(images, texts)  # PIL images, strings", "```", "",
        "Fine-tune from it: `albef retrieval --config configs/retrieval_coco.yaml "
        f"--init-from hf-hub:{repo_id}` (or any task that starts from {task} weights).", "",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)


def export(source: str | os.PathLike, out: str | os.PathLike, *, config: str | os.PathLike | None = None,
           with_momentum: bool = False, license: str = "other", task: str | None = None,
           tags: Sequence[str] = (), repo_id: str | None = None) -> Path:
    """Write the exported folder `out` (see the module docstring) from a run directory, one of
    its weight files, or a weight file with `config` (a released ALBEF .pth). The weights are
    first loaded into the model the config builds, under the one loading policy, so the folder
    always loads completely. `out` must not exist; it appears whole (written under a temp name).
    `repo_id`: the Hub name the card's loading example uses (default ORG/<out's name>)."""


    source, out = Path(source), Path(out)
    if is_hub_name(str(source)) or is_export_dir(source):
        raise CheckpointError(f"{source}: already an exported folder; push it with `albef push` as it is")
    if out.exists():
        raise CheckpointError(f"{out}: already exists; export into a new folder (nothing was written)")
    weights, run = _source_weights(source)
    state, stored = read_weights_and_config(weights)
    if config is not None:
        cfg = load_config(str(config))
    elif stored is not None:
        cfg = Config.from_dict(stored, source=f"{weights} (stored config)")
    else:
        raise CheckpointError(f"{weights}: no config stored with these weights and no config.yaml beside them; "
                              "pass --config (the YAML the model was trained with, e.g. configs/pretrain.yaml)")
    results = _results(run)
    task = task or infer_task(state, cfg, results)
    if get_task(task) is None:
        raise CheckpointError(f"--task {task}: not a task (one of: {', '.join(tasks())})")

    build_cfg = Config.from_dict(cfg.to_dict(), source=str(weights))  # every weight comes from the file
    build_cfg.model.vision.pretrained, build_cfg.model.vision.checkpoint = False, None
    build_cfg.model.text.pretrained, build_cfg.model.init_checkpoint = False, None
    build_cfg.train.compile = False
    model = _task(task).build_model(build_cfg)
    report = load_weights(model, state, str(weights))
    print(report, file=sys.stderr)
    full = model.state_dict()
    left_out = {} if with_momentum else _momentum_modules(full)
    keep = {k: v for k, v in full.items()
            if with_momentum or (k.split(".", 1)[0] not in left_out and k not in QUEUE_KEYS)}
    aliases = _tied_aliases(keep)
    tensors = {k: v.detach().cpu().contiguous() for k, v in keep.items() if k not in aliases}
    metadata = {"format": "pt", TIED_META: json.dumps(aliases)}
    if left_out:
        metadata[MOMENTUM_META] = json.dumps(left_out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / WEIGHTS_FILE).write_bytes(safetensors_bytes(tensors, metadata))
        shared = Config.from_dict(cfg.to_dict(), source=str(weights))
        shared.model.text.bert, shared.model.text.tokenizer = TEXT_DIR, None
        shared.model.vision.pretrained, shared.model.text.pretrained = False, False
        shared.model.vision.checkpoint, shared.model.init_checkpoint = None, None
        save_config(shared, str(tmp / CONFIG_FILE))
        (tmp / CONFIG_FILE).write_text(
            "# albef export: model.text.bert names this folder's bert/ (BERT config and tokenizer); albef.load and\n"
            "# --init-from resolve it. Starting weights and data are described in README.md.\n"
            + (tmp / CONFIG_FILE).read_text())
        (tmp / TEXT_DIR).mkdir()
        BertConfig.from_pretrained(cfg.model.text.bert).to_json_file(tmp / TEXT_DIR / "config.json")
        build_tokenizer(cfg.model).save_pretrained(str(tmp / TEXT_DIR))
        for extra in {p.name for p in (tmp / TEXT_DIR).iterdir()} - set(TEXT_FILES):
            (tmp / TEXT_DIR / extra).unlink()  # e.g. a chat template: not part of a BERT tokenizer
        (tmp / CARD_FILE).write_text(model_card(
            repo_id=repo_id or f"ORG/{out.name}", task=task, cfg=cfg, model=model, exported=tensors,
            with_momentum=with_momentum, source=source, weights=weights, run=run, results=results,
            steps=_steps(run), license=license, tags=tags), encoding="utf-8")
        read_export(tmp)  # what was written reads back under the loader's own checks
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- pushing


def check_push(repo_id: str) -> str:
    """Before any work: a valid repository name, HF_HUB_OFFLINE unset, a token, the Hub reachable
    with it. Returns the token; CheckpointError (one line) otherwise."""
    from huggingface_hub import HfApi, get_token

    if not REPO_ID.fullmatch(repo_id):
        raise CheckpointError(f"{repo_id}: not a Hub repository name; write org/name")
    if hub_offline():
        raise CheckpointError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    token = get_token()
    if not token:
        raise CheckpointError(f"cannot push to {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    try:
        HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).whoami(token=token)
    except Exception as err:  # no network, a revoked token, the Hub down
        raise CheckpointError(f"cannot push to {repo_id}: the Hugging Face Hub does not answer with this token "
                              f"({type(err).__name__}: {first_line(err)})") from None
    return token


def push(folder: str | os.PathLike, repo_id: str, *, public: bool = False, token: str | None = None) -> str:
    """Upload the exported `folder` (checked as a reader would) to `repo_id`, private unless
    `public`; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_export_dir(folder)
    check_safetensors_header(folder / WEIGHTS_FILE)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=not public, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message=f"albef export of {folder.name}")
    except Exception as err:
        raise CheckpointError(f"cannot push to {repo_id}: {type(err).__name__}: {first_line(err)}") from None
    return str(getattr(info, "commit_url", info))


# ----------------------------------------------------------------------------- command line


def _fail(err: BaseException) -> int:
    sys.stderr.write(f"error: {' '.join(str(err).split())}\n")
    sys.stderr.flush()
    return 2


def _user_errors() -> tuple[type[BaseException], ...]:

    return CheckpointError, ConfigError, OSError, ValueError


def export_main(argv: Sequence[str] | None = None) -> int:
    """`albef export SOURCE OUT_DIR [--config CFG] [--with-momentum] [--license L] [--task T] [--push org/name]`."""
    parser = argparse.ArgumentParser(prog="albef export", description="Write a run or weight file as a pickle-free "
                                     "folder (model.safetensors, config.yaml, tokenizer, README.md model card).")
    parser.add_argument("source", help="run directory, weight file (.pt/.pth/.safetensors) or .dcp checkpoint")
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument("--config", help="YAML config for weights without one (released ALBEF .pth files)")
    parser.add_argument("--with-momentum", action="store_true", help="include the momentum copies and queues")
    parser.add_argument("--license", default="other", help="license in the model card metadata (default: other)")
    parser.add_argument("--task", choices=list(tasks()), help="the task (default: from the weights)")
    parser.add_argument("--tag", action="append", default=[], help="extra model card tag (repeatable)")
    parser.add_argument("--push", metavar="ORG/NAME", help="then upload the folder to this Hub repository")
    parser.add_argument("--public", action="store_true", help="with --push: a public repository (default private)")
    args = parser.parse_args(argv)
    try:
        token = check_push(args.push) if args.push else None
        out = export(args.source, args.out, config=args.config, with_momentum=args.with_momentum,
                     license=args.license, task=args.task, tags=args.tag, repo_id=args.push)
        print(f"exported {args.source} to {out}")
        if args.push:
            print(f"pushed {out} to {args.push}: {push(out, args.push, public=args.public, token=token)}")
    except _user_errors() as err:
        return _fail(err)
    return 0


def push_main(argv: Sequence[str] | None = None) -> int:
    """`albef push SOURCE org/name [--public] [export options]`: SOURCE is an exported folder
    (uploaded as it is) or anything `albef export` takes (exported to a temp folder first)."""
    parser = argparse.ArgumentParser(prog="albef push", description="Upload a run or an exported folder to the "
                                     "Hugging Face Hub (private unless --public).")
    parser.add_argument("source", help="exported folder, run directory or weight file")
    parser.add_argument("repo_id", metavar="org/name", help="the Hub repository (created if needed)")
    parser.add_argument("--public", action="store_true", help="a public repository (default: private)")
    parser.add_argument("--config", help="YAML config for weights without one (released ALBEF .pth files)")
    parser.add_argument("--with-momentum", action="store_true", help="include the momentum copies and queues")
    parser.add_argument("--license", default="other", help="license in the model card metadata (default: other)")
    parser.add_argument("--task", choices=list(tasks()), help="the task (default: from the weights)")
    args = parser.parse_args(argv)
    try:
        token = check_push(args.repo_id)
        if is_export_dir(args.source):
            url = push(args.source, args.repo_id, public=args.public, token=token)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                folder = export(args.source, Path(tmp) / args.repo_id.split("/")[1], config=args.config,
                                with_momentum=args.with_momentum, license=args.license, task=args.task,
                                repo_id=args.repo_id)
                url = push(folder, args.repo_id, public=args.public, token=token)
        print(f"pushed {args.source} to {args.repo_id}: {url}")
    except _user_errors() as err:
        return _fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
