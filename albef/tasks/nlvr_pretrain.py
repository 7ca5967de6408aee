"""NLVR2's text-assignment (TA) pretraining stage (ALBEF Pretrain_nlvr.py): on image-caption
pairs, each caption is shown with two images of the batch and the model says which one it
describes (image 0, image 1, or neither). Its checkpoint initialises NLVR2 fine-tuning.

    albef-nlvr-pretrain --config configs/nlvr_pretrain.yaml --init-from ALBEF_PRETRAIN.pth
    torchrun --nproc_per_node=8 -m albef.tasks.nlvr_pretrain --config configs/nlvr_pretrain.yaml \
        --init-from ALBEF_PRETRAIN.pth
    albef-nlvr --config configs/nlvr.yaml --init-from RUN_DIR   # then NLVR2 from the TA run

Data: the pretraining caption files (data.train_files). `--init-from` a pretraining checkpoint
applies ALBEF's rule: text layers as they are, fusion layer n -> layers 2(n-F)+F and
2(n-F)+F+1; the ViT, vision_proj, text_proj and temp load as they are; momentum copies, queues,
ITM and MLM heads are unused; `ta_head` starts fresh. A TA checkpoint loads as it is.

ALBEF has no evaluation for this stage; with eval.val_files / eval.test_files (caption files)
this task reports the TA accuracy (%) with a fixed draw of the image pairs (chance is 1/3 to
2/3 depending on the model's guesses; always answering 'image 0 or 1' scores about 33%).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import nn

from albef.config import Config, ConfigError
from albef.data.collate import Collator
from albef.data.datasets import CaptionDataset, build_eval_loader, load_annotations, preflight_files
from albef.data.transforms import eval_transform
from albef.dist import DistInfo
from albef.engine.evaluation import eval_files, inference_autocast, progress, stoppable
from albef.metrics import classification_accuracy
from albef.models import build_text_assignment, build_tokenizer
from albef.models.classify import TA_ADAPTER, TextAssignment
from albef.tasks.base import register_task
from albef.tasks.pretrain import PretrainTask
from albef.tasks.ve import FSDP_SHARED_KV



@register_task("nlvr-pretrain", help="NLVR2 text-assignment pretraining")
class TextAssignmentTask(PretrainTask):
    """The caption data and loader of pretraining, the TA model and loss."""

    name = "nlvr_pretrain"
    best_metric = None  # ALBEF keeps every epoch's checkpoint and uses the last
    description = "ALBEF NLVR2 text-assignment pretraining"
    weight_adapter = TA_ADAPTER  # ALBEF Pretrain_nlvr.py's rule (albef/models/classify.py)

    def format_result(self, result: dict[str, float]) -> None:
        """Not the retrieval table: the generic rows (albef/engine/results.py)."""
        return None

    def check(self, cfg: Config, training: bool = True) -> None:
        if cfg.train.strategy == "fsdp":
            raise ConfigError(FSDP_SHARED_KV)
        if training and cfg.train.batch_size < 3:
            raise ConfigError(f"train.batch_size: text assignment draws two other images of the batch per "
                              f"caption, so it needs at least 3 (got {cfg.train.batch_size})")
        for key in ("val_files", "test_files"):  # batches of unreadable images are skipped: data.max_bad_fraction
            preflight_files(getattr(cfg.eval, key), load_annotations, lambda e: [e["image"]], cfg.eval.image_root,
                            f"eval.{key}", cfg.data.max_bad_fraction)

    def build_model(self, cfg: Config) -> TextAssignment:
        return build_text_assignment(cfg.model)

    def forward_step(self, model: nn.Module, batch: dict[str, Any], alpha: float) -> dict[str, Any]:
        if len(batch["images"]) < 3:  # unreadable images left too few to draw two others per caption:
            # a non-finite loss on every parameter makes the engine skip and count this step, as any bad step
            nan = sum(p.sum() for p in model.parameters() if p.requires_grad) * float("nan")
            return {"loss": nan, "loss_ta": nan.detach(), "acc": torch.zeros((), device=nan.device)}
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        return {k: out[k] for k in ("loss", "loss_ta", "acc")}

    def after_optimizer_step(self, model: nn.Module, outputs: list[dict[str, Any]]) -> None:
        pass  # no momentum encoders, no queues

    def find_unused_parameters(self, cfg: Config) -> bool:
        return True  # text_proj and temp get no gradient (nor does vision_proj: it only picks images)

    @torch.no_grad()
    def evaluate(self, model: TextAssignment, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        """TA accuracy (%) over the split's caption files, the image pairs drawn with a generator
        seeded by `seed` (the same draw for every evaluation of a run). Every rank computes it whole,
        unsharded: the draw runs through the batches in order, so a shard would change it."""
        files = eval_files(cfg, split)
        transform = eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std)
        dataset = CaptionDataset(files, cfg.eval.image_root, transform, cfg.data.max_words)
        loader = build_eval_loader(dataset, Collator(build_tokenizer(cfg.model), cfg.data.max_tokens),
                                   batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers)
        generator = torch.Generator(dist.device).manual_seed(cfg.seed)
        predictions: list[int] = []
        labels: list[int] = []
        with inference_autocast(dist.device, cfg.train.precision), \
                progress(len(dataset), f"{split}: text assignment", "caption") as bar:
            for batch in stoppable(loader, len(loader)):
                bar.update(len(batch["index"]) + sum(batch["skipped"].values()))
                if len(batch["index"]) < 3:
                    continue
                out = model(batch["images"].to(dist.device), batch["input_ids"].to(dist.device),
                            batch["attention_mask"].to(dist.device), generator=generator)
                predictions += out["logits"].argmax(dim=1).tolist()
                labels += out["labels"].tolist()
        return {"acc": classification_accuracy(predictions, labels), "num_samples": len(labels)}


def main(argv: Sequence[str] | None = None) -> int:
    return TextAssignmentTask.main(argv, "albef-nlvr-pretrain")


if __name__ == "__main__":
    sys.exit(main())
