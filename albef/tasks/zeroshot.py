"""Zero-shot image classification with an ALBEF model (open_clip's best-known evaluation, plus
an ALBEF twist: ITM re-ranking of each image's top-k classes).

    albef zeroshot --config configs/zeroshot_demo.yaml --init-from demo_runs/pretrain
    albef zeroshot --config CFG --init-from CKPT eval.test_files=[IMAGEFOLDER_OR_JSON] zeroshot.rerank_k=3

Data: `eval.val_files` / `eval.test_files` name ImageFolder-style directories (`root/<class>/*.jpg`)
or JSON lists of `{"image": path, "label": class name}` (paths relative to `eval.image_root`).
Class names come from `zeroshot.classes` or `zeroshot.classes_file`, else from the data; prompt
templates ("a photo of a {}.") from `zeroshot.templates` or `zeroshot.templates_file`.

Scores: each class's text embedding is the mean of its normalised per-template ITC features,
renormalised (open_clip's `build_zero_shot_classifier`); an image's ITC score for a class is the
cosine of its image feature with that embedding. With `zeroshot.rerank_k: K > 0` the K best
classes of each image by ITC are re-ordered by the ITM match logit (mean over the templates);
the rest keep the ITC order. Reported: top-1 / top-5 (and the ITC-only ones when re-ranking),
mean per-class accuracy, chance, per-class accuracies; written to OUTPUT_DIR/results/, a
confusion-matrix PNG to OUTPUT_DIR/zeroshot/ and TensorBoard, and a details JSON beside it.

This task only evaluates: the command runs as `--evaluate` (the weights of `--init-from`).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from albef.config import Config, ConfigError
from albef.data.captions import pre_caption
from albef.data.classification import ClassificationDataset, read_class_list
from albef.data.transforms import eval_transform
from albef.dist import DistInfo
from albef.engine.evaluation import (eval_files, gather_rows, inference_autocast, progress, shard_subset,
                                    stoppable)
from albef.metrics import confusion_matrix, per_class_accuracy, topk_accuracy
from albef.build import build_model
from albef.models import build_tokenizer
from albef.tasks.base import Task, register_task
from albef.tasks.pretrain import unwrap
from albef.tasks.retrieval_eval import encode_images, encode_texts, pair_itm_logits


@dataclass
class ZeroShotConfig:
    """Zero-shot classification (albef zeroshot): class names, prompt templates, ITM re-ranking."""
    classes: list[str] = field(default_factory=list)  # class names (empty: classes_file, else the data's)
    classes_file: str | None = None  # JSON list or text file, one name a line
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # "{}" = the class name
    templates_file: str | None = None  # JSON list or text file, one template a line (replaces `templates`)
    rerank_k: int = 0  # re-rank each image's top-k classes by ITM (0: ITC only)
    batch_size: int = 64  # (image, class, template) rows per ITM fusion batch


# ----------------------------------------------------------------------------- scoring (plain functions)

def ensemble_class_embeddings(features: torch.Tensor) -> torch.Tensor:
    """[C, T, D] per-template text features -> [C, D]: the mean of the normalised per-template
    features, renormalised (open_clip's prompt ensemble)."""
    return F.normalize(F.normalize(features, dim=-1).mean(dim=1), dim=-1)


def rerank_topk(itc_scores: torch.Tensor, itm_scores: torch.Tensor) -> torch.Tensor:
    """[N, C] class ranking (best first): each row's first K classes by ITC re-ordered by
    `itm_scores` [N, K] (the ITM score of those K classes, in ITC order), the rest by ITC."""
    ranking = itc_scores.argsort(dim=1, descending=True, stable=True)
    k = itm_scores.shape[1]
    order = itm_scores.argsort(dim=1, descending=True, stable=True)
    ranking[:, :k] = ranking[:, :k].gather(1, order)
    return ranking


def prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class in every template, class-major: row c * T + t."""
    return [template.format(name) for name in classes for template in templates]


@torch.no_grad()
def class_embeddings(model, tokenizer, classes: Sequence[str], templates: Sequence[str], cfg: Config, device):
    """(class embeddings [C, D], text tokens [C*T, L, H], masks [C*T, L]) of the prompts."""
    texts = [pre_caption(t, cfg.data.max_words) for t in prompts(classes, templates)]
    embeds, feats, masks = encode_texts(model, tokenizer, texts, cfg.eval.batch_size, cfg.eval.max_tokens, device)
    return ensemble_class_embeddings(feats.view(len(classes), len(templates), -1)), embeds, masks


@torch.no_grad()
def itm_topk_scores(model, image_embeds: torch.Tensor, topk: torch.Tensor, text_embeds: torch.Tensor,
                    text_masks: torch.Tensor, num_templates: int, batch_size: int, bar=None) -> torch.Tensor:
    """[N, K] ITM match logit of each image with each of its K candidate classes, averaged over
    the templates (`text_embeds` rows class-major, as `prompts`). Every rank calls it (its batch
    loop is `stoppable`, a collective), also with no images (N = 0)."""
    n, k = topk.shape
    images = torch.arange(n, device=topk.device)[:, None, None].expand(n, k, num_templates).reshape(-1)
    rows = (topk[:, :, None] * num_templates + torch.arange(num_templates, device=topk.device)).reshape(-1)
    scores = []
    starts = range(0, len(rows), batch_size)
    for start in stoppable(starts, len(starts)):
        img, txt = images[start : start + batch_size], rows[start : start + batch_size]
        distinct, index = img.unique(sorted=True, return_inverse=True)
        logits = pair_itm_logits(model, image_embeds[distinct], index, text_embeds[txt], text_masks[txt])
        scores.append(logits[:, 1].float())
        if bar is not None:
            bar.update(len(img))
    if not scores:
        return torch.zeros(n, k, device=topk.device)
    return torch.cat(scores).view(n, k, num_templates).mean(dim=2)


def classification_result(ranking: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                          prefix: str = "") -> dict[str, float]:
    predictions = ranking[:, 0]
    per_class = per_class_accuracy(predictions, labels, len(classes))
    result = {f"{prefix}top1": topk_accuracy(ranking, labels, 1), f"{prefix}top5": topk_accuracy(ranking, labels, 5),
              f"{prefix}mean_class_acc": float(np.nanmean(per_class))}
    if not prefix:
        result.update({f"class_acc/{name}": float(a) for name, a in zip(classes, per_class) if not np.isnan(a)})
    return result


# ----------------------------------------------------------------------------- the task

def images_only(batch: list) -> torch.Tensor:
    """Collate of (image, label) samples to the image batch (the labels are read from the dataset)."""
    return torch.stack([image for image, _ in batch])


@register_task("zeroshot", help="zero-shot image classification (ITC prompt ensemble, optional ITM re-ranking)")
class ZeroShotTask(Task):
    """Zero-shot classification of ImageFolder / JSON-list images by class-name prompts."""

    best_metric = "top1"
    description = "ALBEF zero-shot image classification (evaluation only: runs as --evaluate)"
    config_section, config_class = "zeroshot", ZeroShotConfig
    config_ranges = {"rerank_k": "[0, inf)", "batch_size": "[1, inf)"}

    @classmethod
    def main(cls, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        if not any(a in ("-h", "--help", "--evaluate") for a in argv):
            argv.append("--evaluate")
        return super().main(argv, prog)

    def check(self, cfg: Config, training: bool = True) -> None:
        z = cfg.zeroshot
        if not (cfg.eval.val_files or cfg.eval.test_files):
            raise ConfigError("eval.test_files: zero-shot classification needs images: an ImageFolder directory "
                              "(root/<class>/*.jpg) or a JSON list of {image, label}")
        for key in ("classes_file", "templates_file"):
            path = getattr(z, key)
            if path and not os.path.isfile(path):
                raise ConfigError(f"zeroshot.{key}: file not found: '{path}'")
        for template in self.templates(cfg):
            if template.count("{}") != 1:
                raise ConfigError(f"zeroshot.templates: {template!r} must hold the class name once as '{{}}'")

    def templates(self, cfg: Config) -> list[str]:
        z = cfg.zeroshot
        return read_class_list(z.templates_file) if z.templates_file else list(z.templates)

    def build_model(self, cfg: Config) -> nn.Module:
        return build_model(cfg)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        model, z, device = unwrap(model), cfg.zeroshot, dist.device
        classes = list(z.classes) or (read_class_list(z.classes_file) if z.classes_file else None)
        transform = eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std)
        dataset = ClassificationDataset(eval_files(cfg, split), cfg.eval.image_root, transform, classes)
        classes, templates = dataset.classes, self.templates(cfg)
        tokenizer = build_tokenizer(cfg.model)
        mine = shard_subset(dataset)
        loader = DataLoader(mine, batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                            collate_fn=images_only)
        with inference_autocast(device, cfg.train.precision):
            class_emb, text_embeds, text_masks = class_embeddings(model, tokenizer, classes, templates, cfg, device)
            with progress(len(mine), f"{split}: encode images", "img") as bar:
                image_embeds, image_feats = encode_images(model, loader, device, bar=bar)
        itc = image_feats @ class_emb.t()  # [n, C] cosine similarities
        k = min(z.rerank_k, len(classes))
        if k:  # every rank, also one without images: the re-ranking loop is a collective
            topk = itc.topk(k, dim=1).indices
            with inference_autocast(device, cfg.train.precision), \
                    progress(topk.numel() * len(templates), f"{split}: ITM re-rank", "pair") as bar:
                itm = itm_topk_scores(model, image_embeds, topk, text_embeds, text_masks, len(templates),
                                      z.batch_size, bar)
            ranking = rerank_topk(itc, itm)
        else:
            ranking = itc.argsort(dim=1, descending=True, stable=True)
        itc_ranking, _ = gather_rows(itc.argsort(dim=1, descending=True, stable=True))
        ranking, _ = gather_rows(ranking)
        ranking, itc_ranking = ranking.cpu().numpy(), itc_ranking.cpu().numpy()
        labels = np.asarray(dataset.labels)

        result = classification_result(ranking, labels, classes)
        if k:
            result.update(classification_result(itc_ranking, labels, classes, prefix="itc_"))
        result.update(num_images=len(labels), num_classes=len(classes), rerank_k=k,
                      chance_top1=100.0 / len(classes), chance_top5=100.0 * min(5, len(classes)) / len(classes))
        if dist.rank == 0:
            self.write_outputs(cfg, split, classes, templates, labels, ranking, result)
        return result

    def write_outputs(self, cfg: Config, split: str, classes: list[str], templates: list[str], labels: np.ndarray,
                      ranking: np.ndarray, result: dict[str, float]) -> None:
        """OUTPUT_DIR/zeroshot/{split}.json (classes, templates, confusion matrix, predictions) and
        {split}_confusion.png, the picture also to TensorBoard."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torch.utils.tensorboard import SummaryWriter

        out = Path(cfg.output_dir) / "zeroshot"
        out.mkdir(parents=True, exist_ok=True)
        matrix = confusion_matrix(ranking[:, 0], labels, len(classes))
        details = {"split": split, "classes": classes, "templates": templates, "result": result,
                   "confusion_matrix": matrix.tolist(), "labels": labels.tolist(),
                   "predictions": ranking[:, 0].tolist()}
        tmp = out / f"{split}.json.tmp"
        tmp.write_text(json.dumps(details, indent=1))
        os.replace(tmp, out / f"{split}.json")

        side = max(4.0, 0.5 * len(classes) + 2)
        fig, ax = plt.subplots(figsize=(side, side), dpi=100)
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"zero-shot {split}: top-1 {result['top1']:.1f}% (chance {result['chance_top1']:.1f}%)")
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center",
                        color="white" if count > matrix.max() / 2 else "black", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{split}_confusion.png")
        writer = SummaryWriter(str(Path(cfg.output_dir) / "tb"))
        writer.add_figure(f"zeroshot/{split}_confusion", fig, global_step=0)  # closes the figure
        writer.close()

    def format_result(self, result: dict[str, float]) -> str:
        lines = [f"{'':10s}{'top-1':>8s}{'top-5':>8s}{'class':>8s}"]
        rows = [("itc", "itc_"), ("itc + itm", "")] if "itc_top1" in result else [("itc", "")]
        for name, prefix in rows:
            lines.append(f"{name:10s}{result[prefix + 'top1']:8.2f}{result[prefix + 'top5']:8.2f}"
                         f"{result[prefix + 'mean_class_acc']:8.2f}")
        lines.append(f"{'chance':10s}{result['chance_top1']:8.2f}{result['chance_top5']:8.2f}")
        lines.append(f"{int(result['num_images'])} images, {int(result['num_classes'])} classes"
                     + (f", ITM re-ranking of the top {int(result['rerank_k'])}" if result["rerank_k"] else ""))
        return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return ZeroShotTask.main(argv, "albef-zeroshot")


if __name__ == "__main__":
    sys.exit(main())
