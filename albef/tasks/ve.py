"""SNLI-VE fine-tuning (ALBEF VE.py): does the image entail, contradict or say nothing about the
sentence? Also the base of the NLVR2 task (albef/tasks/nlvr.py).

    albef-ve --config configs/ve.yaml --init-from ALBEF.pth [--output-dir DIR] [key.sub=value ...]
    torchrun --nproc_per_node=8 -m albef.tasks.ve --config configs/ve.yaml --init-from ALBEF.pth
    albef-ve --config configs/ve.yaml --evaluate --init-from VE_CHECKPOINT.pth

Training: the fused [CLS] state through `cls_head`; loss (1 - alpha) CE + alpha soft-CE against
the momentum model's softmax (model.distill). Evaluation: accuracy (%) on eval.val_files (each
epoch; best.pt keeps the best) and eval.test_files (best.pt at the end), next to the majority-class
baseline; predictions go to OUTPUT_DIR/predictions/{split}.jsonl.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from albef.config import Config, ConfigError, check_worker_decode
from albef.data.datasets import AnnotationError, build_eval_loader, build_train_loader, preflight_files, set_epoch
from albef.data.reasoning import VE_LABELS, LabelCollator, ReasoningDataset, load_nlvr_annotations, load_ve_annotations
from albef.data.transforms import eval_transform, train_transform
from albef.dist import DistInfo
from albef.engine.evaluation import (eval_files, gather_lists, inference_autocast, progress, shard_subset,
                                    stoppable)
from albef.metrics import classification_accuracy
from albef.models import build_classifier, build_tokenizer
from albef.models.classify import VE_ADAPTER, Classifier
from albef.tasks.base import Task, register_task

FSDP_SHARED_KV = ("train.strategy: 'fsdp' shards each BERT layer on its own, but NLVR2 / TA fusion layer pairs share "
                  "their cross-attention key/value weights; use train.strategy=ddp")


@register_task("ve", help="SNLI-VE visual entailment fine-tuning and evaluation")
class VETask(Task):
    """SNLI-VE on the engine: a `Classifier` over one image, 3 classes."""

    name = "ve"
    kind = "ve"  # ReasoningDataset kind
    num_classes = len(VE_LABELS)
    num_images = 1
    weight_adapter = VE_ADAPTER  # ALBEF VE.py's rule (albef/models/classify.py)
    best_metric = "acc"
    description = "ALBEF SNLI-VE fine-tuning and evaluation"
    label_names = {v: k for k, v in VE_LABELS.items()}

    def __init__(self) -> None:
        self.loader = None  # built once: its workers persist across epochs

    # ------------------------------------------------------------------------- engine hooks

    def check(self, cfg: Config, training: bool = True) -> None:
        """Preflight: every annotation file used parses (AnnotationError names file and entry)."""
        load = load_ve_annotations if self.kind == "ve" else load_nlvr_annotations
        if training:
            check_worker_decode(cfg, f"albef-{self.kind}")
        if training:
            for file in cfg.data.train_files:
                if not load([file]):
                    raise AnnotationError(f"{file}: no entries; data.train_files must each list at least one")
        for key in ("val_files", "test_files"):  # an unreadable sample scores as wrong: data.max_bad_fraction
            preflight_files(getattr(cfg.eval, key), load, lambda e: e["images"], cfg.eval.image_root,
                            f"eval.{key}", cfg.data.max_bad_fraction)
        if self.num_images == 2 and cfg.train.strategy == "fsdp":
            raise ConfigError(FSDP_SHARED_KV)
        if training and cfg.data.format != "json":
            raise ConfigError(f"data.format: {self.name} reads JSON annotation files (got {cfg.data.format!r})")

    def build_model(self, cfg: Config) -> Classifier:
        return build_classifier(cfg.model, self.num_classes, self.num_images)

    def build_train_loader(
        self, cfg: Config, dist: DistInfo, epoch: int, consumed: int
    ) -> tuple[Iterable[dict[str, Any]], int]:
        if self.loader is None:
            d = cfg.data
            transform = train_transform(cfg.model.vision.image_size, d.mean, d.std, d.crop_scale, d.randaugment, d.hflip)
            dataset = ReasoningDataset(self.kind, d.train_files, d.image_root, transform, d.max_words, cfg.seed)
            self.loader = build_train_loader(
                dataset, LabelCollator(build_tokenizer(cfg.model), d.max_tokens), batch_size=cfg.train.batch_size,
                num_workers=d.num_workers, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
        set_epoch(self.loader, epoch, consumed)
        return self.loader, len(self.loader.dataset) // dist.world_size // cfg.train.batch_size

    def forward_step(self, model: nn.Module, batch: dict[str, Any], alpha: float) -> dict[str, Any]:
        labels = batch["labels"]
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], targets=labels, alpha=alpha)
        out["acc"] = (out.pop("logits").argmax(dim=1) == labels).float().mean()
        return out

    def find_unused_parameters(self, cfg: Config) -> bool:
        return False

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, model: Classifier, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        """Accuracy (%) of the student on `split`; each rank scores a contiguous block of samples."""
        files = eval_files(cfg, split)
        transform = eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std)
        dataset = ReasoningDataset(self.kind, files, cfg.eval.image_root, transform, cfg.data.max_words)
        shard = shard_subset(dataset)
        loader = build_eval_loader(shard, LabelCollator(build_tokenizer(cfg.model), cfg.eval.max_tokens),
                                   batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers)
        indices, predictions = [], []
        with inference_autocast(dist.device, cfg.train.precision), \
                progress(len(shard), f"{split}: {self.name}", "sample") as bar:
            for batch in stoppable(loader, len(loader)):
                bar.update(len(batch["index"]) + sum(batch["skipped"].values()))
                if len(batch["index"]) == 0:
                    continue
                images = batch["images"].to(dist.device, non_blocking=True)
                logits = model(images, batch["input_ids"].to(dist.device), batch["attention_mask"].to(dist.device))
                indices += batch["index"].tolist()
                predictions += logits.argmax(dim=1).tolist()
        predicted = dict(gather_lists(zip(indices, predictions)))
        labels = dataset.labels
        # An unreadable sample counts as wrong (it has no prediction).
        ordered = [predicted.get(i, -1) for i in range(len(labels))]
        majority = Counter(labels).most_common(1)[0][1] if labels else 0
        result = {
            "acc": classification_accuracy(ordered, labels),
            "majority_acc": 100.0 * majority / max(len(labels), 1),
            "num_samples": len(labels),
            "num_unreadable": len(labels) - len(predicted),
        }
        if dist.rank == 0:
            self._write_predictions(Path(cfg.output_dir) / "predictions" / f"{split}.jsonl", dataset, ordered)
        return result

    def _write_predictions(self, path: Path, dataset: ReasoningDataset, predictions: list[int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fp:
            for ann, pred in zip(dataset.samples, predictions):
                row = {"images": ann["images"], "sentence": ann["sentence"],
                       "label": self.label_names[ann["label"]], "prediction": self.label_names.get(pred)}
                fp.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    return VETask.main(argv, "albef-ve")


if __name__ == "__main__":
    sys.exit(main())
