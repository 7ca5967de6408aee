"""ALBEF pretraining task: image-caption pairs, ITC + ITM + MLM with momentum distillation."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from albef.config import Config
from albef.data.collate import Collator
from albef.data.datasets import (CaptionDataset, build_train_loader, check_data_files, load_annotations, preflight_files,
                                  set_epoch, webdataset_pipeline)
from albef.data.masking import MLM_KEYS, MLMMasking
from albef.data.transforms import train_transform
from albef.dist import DistInfo
from albef.build import build_model
from albef.models import build_tokenizer
from albef.tasks.base import Task, register_task
from albef.tasks.retrieval_eval import evaluate_retrieval, format_table


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


@register_task("pretrain", help="ALBEF pretraining (ITC + ITM + MLM) from a YAML config")
class PretrainTask(Task):
    """Supplies the engine with the ALBEF model, the caption data and the pretraining step."""

    best_metric = None  # pretraining keeps no best.pt; val retrieval is logged
    description = "ALBEF pretraining (ITC + ITM + MLM)."

    def __init__(self) -> None:
        self.loader: DataLoader | None = None  # built once: its workers persist across epochs
        self.same_id_positives = False
        self.masking: MLMMasking | None = None

    def check(self, cfg: Config, training: bool = True) -> None:
        """Before anything is built: the caption annotation and shard files are well-formed, and
        the evaluation files are not empty and every one of their images reads (the recall needs
        all of them)."""
        check_data_files(cfg, training)
        for key in ("val_files", "test_files"):
            preflight_files(getattr(cfg.eval, key), load_annotations, lambda e: [e["image"]], cfg.eval.image_root,
                            f"eval.{key}", 0.0)

    def build_model(self, cfg: Config) -> nn.Module:
        self.same_id_positives = cfg.loss.same_id_positives
        model = build_model(cfg)
        # the loader masks the captions as this model would (MLMMasking: in the workers, no host sync)
        self.masking = MLMMasking(model.mlm_probability, model.token_ids, model.text_encoder.config.vocab_size,
                                  model.mlm_mask_sep) if model.loss_weights["mlm"] else None
        return model

    def build_train_loader(
        self, cfg: Config, dist: DistInfo, epoch: int, consumed: int
    ) -> tuple[Iterable[dict[str, Any]], int]:
        """The loader positioned at `consumed` global samples into `epoch`, and the number of
        micro-batches one rank draws in a full epoch."""
        if self.loader is None:
            self.loader = self._make_loader(cfg, dist)
        set_epoch(self.loader, epoch, consumed)
        return self.loader, self._batches_per_epoch(cfg, dist)

    def build_train_dataset(self, cfg: Config):
        """The training samples (a task with another annotation format overrides this)."""
        d = cfg.data
        transform = train_transform(
            cfg.model.vision.image_size, d.mean, d.std, d.crop_scale, d.randaugment, d.hflip, d.jpeg_draft,
            decode=d.decode)
        if d.format == "wds":
            return webdataset_pipeline(d.shards, transform, d.max_words, cfg.seed, d.num_samples, d.caption_list)
        return CaptionDataset(d.train_files, d.image_root, transform, d.max_words, cfg.seed, d.caption_list)

    def _make_loader(self, cfg: Config, dist: DistInfo) -> DataLoader:
        d = cfg.data
        dataset = self.build_train_dataset(cfg)
        tokenizer = build_tokenizer(cfg.model)
        return build_train_loader(
            dataset, Collator(tokenizer, d.max_tokens, d.pad_to_max_tokens, self.masking), batch_size=cfg.train.batch_size,
            num_workers=d.num_workers, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)

    def _batches_per_epoch(self, cfg: Config, dist: DistInfo) -> int:
        batch_size = cfg.train.batch_size
        if cfg.data.format == "wds":  # each worker yields its share of num_samples, batched apart
            workers = max(1, cfg.data.num_workers)
            per_worker = math.ceil(cfg.data.num_samples / (dist.world_size * workers))
            return workers * (per_worker // batch_size)
        return len(self.loader.dataset) // dist.world_size // batch_size

    def forward_step(self, model: nn.Module, batch: dict[str, Any], alpha: float) -> dict[str, Any]:
        ids = batch["ids"] if self.same_id_positives else None
        masks = {k: batch[k] for k in MLM_KEYS} if "mlm_input_ids" in batch else None
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], alpha=alpha, ids=ids,
                    mlm_masks=masks)
        out["temp"] = unwrap(model).temp.detach()
        return out

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, outputs: list[dict[str, Any]]) -> None:
        """Enqueue every micro-batch's momentum features (the engine ran the EMA before the step's
        first forward)."""
        updates = [out["queue_update"] for out in outputs if "queue_update" in out]
        if updates:
            model.enqueue(*(torch.cat(parts) for parts in zip(*updates)))

    def evaluate(self, model: nn.Module, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        """Zero-shot retrieval (ITC ranking, ITM re-ranking) on eval.val_files / eval.test_files."""
        return evaluate_retrieval(unwrap(model), cfg, dist.device, split)

    def format_result(self, result: dict[str, float]) -> str:
        return format_table(result)

    def find_unused_parameters(self, cfg: Config) -> bool:
        """A disabled loss term leaves its head (ITM head, MLM head) without gradients."""
        weights = cfg.loss.weights
        return min(weights.itc, weights.itm, weights.mlm) == 0
