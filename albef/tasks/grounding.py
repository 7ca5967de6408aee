"""Weakly supervised visual grounding (RefCOCO+), as ALBEF's `Grounding.py`.

Training is retrieval fine-tuning (ITC + ITM) on referring expressions paired with their whole
image; no box is ever seen. Evaluation localises each expression with Grad-CAM on the ITM score
(`albef.gradcam`, layer `grounding.block_num`), upsamples the map to the original image, scores
every detection box of the image by ``map[box].sum() / area ** box_alpha`` and counts the
expression as found when the best box has IoU >= 0.5 with the true box; accuracy per split
(``val_d``, ``testA_d``, ``testB_d``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from albef.data.grounding import (
    SPLITS,
    GroundingEvalDataset,
    collate_eval,
    load_boxes,
    load_refs,
)
from albef.data.datasets import AnnotationError
from albef.data.transforms import eval_transform
from albef.dist import get_rank, get_world_size, is_distributed
from albef.gradcam import gradcam, upsample_map

IOU_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- metric


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes with ALBEF's pixel convention (`computeIoU`).

    A box covers pixels x .. x + w - 1; the intersection counts only when it is more than one
    pixel wide and tall (ALBEF's strict `<`), the union is w1 h1 + w2 h2 - intersection.
    """
    x1, y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def score_boxes(heat: Tensor, boxes: Sequence[Sequence[float]], alpha: float = 0.5) -> Tensor:
    """ALBEF's box score ``heat[y:y+h, x:x+w].sum() / (w h) ** alpha`` for each [x, y, w, h] box
    on the upsampled map `heat` [H, W] (integer parts of the corners, as the original slices).
    Boxes without area score -inf."""
    scores = []
    for x, y, w, h in (b[:4] for b in boxes):
        area = w * h
        if area <= 0:
            scores.append(heat.new_tensor(float("-inf")))
            continue
        region = heat[max(int(y), 0) : max(int(y + h), 0), max(int(x), 0) : max(int(x + w), 0)]
        scores.append(region.sum() / area**alpha)
    return torch.stack(scores) if scores else heat.new_zeros(0)


def pick_box(heat: Tensor, boxes: Sequence[Sequence[float]], alpha: float = 0.5) -> int:
    """Index of the best-scoring box (the first of equals)."""
    if not boxes:
        raise ValueError("no candidate boxes")
    return int(score_boxes(heat, boxes, alpha).argmax())


def grounding_accuracy(splits: Sequence[str], ious: Sequence[float], suffix: str = "_d") -> dict[str, float]:
    """Fraction of references with IoU >= 0.5, per split present (keys ``{split}{suffix}``)."""
    result = {}
    for split in SPLITS:
        hits = [iou >= IOU_THRESHOLD for s, iou in zip(splits, ious) if s == split]
        if hits:
            result[f"{split}{suffix}"] = sum(hits) / len(hits)
    return result


# ----------------------------------------------------------------------------- evaluation


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int, device) -> tuple[Tensor, Tensor]:
    tokens = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def _gather(records: list) -> list:
    if not is_distributed():
        return records
    parts = [None] * get_world_size()
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def evaluate_grounding(model, tokenizer, cfg, files: Sequence[str], device) -> tuple[dict[str, float], list[dict]]:
    """Grad-CAM grounding accuracy of `model` on the references of `files`.

    Runs on every rank (each takes every world_size-th reference) and returns, on every rank, the
    accuracies (``{split}_d`` with `grounding.det_file`'s boxes, ``{split}_gt`` with
    `grounding.coco_file`'s when set, ``num_refs``) and one prediction per reference.
    """
    gcfg = cfg.grounding
    refs = load_refs(files, gcfg.refs_file)
    box_sets = {"_d": load_boxes(gcfg.det_file)}
    if gcfg.coco_file:
        box_sets["_gt"] = load_boxes(gcfg.coco_file)
    for suffix, boxes in box_sets.items():
        source = gcfg.det_file if suffix == "_d" else gcfg.coco_file
        for ref in refs:
            if not boxes.get(str(ref["image_id"])):
                raise AnnotationError(f"{source}: no boxes for image_id {ref['image_id']} (ref_id {ref['ref_id']})")

    dataset = GroundingEvalDataset(
        refs, cfg.eval.image_root, eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std),
        cfg.data.max_words,
    )
    shard = Subset(dataset, range(get_rank(), len(dataset), get_world_size()))
    loader = DataLoader(shard, batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                        collate_fn=collate_eval, pin_memory=torch.device(device).type == "cuda")
    was_training = model.training
    model.eval()
    records = []
    for images, texts, indices, sizes in loader:
        input_ids, attention_mask = tokenize(tokenizer, texts, cfg.eval.max_tokens, device)
        cams = gradcam(model, images.to(device), input_ids, attention_mask, gcfg.block_num).float()
        for cam, index, (width, height) in zip(cams, indices, sizes):
            ref = refs[index]
            heat = upsample_map(cam, height, width)
            record = {"ref_id": ref["ref_id"], "split": ref["split"]}
            for suffix, boxes in box_sets.items():
                candidates = boxes[str(ref["image_id"])]
                box = candidates[pick_box(heat, candidates, gcfg.box_alpha)]
                record[f"box{suffix}"] = box
                record[f"iou{suffix}"] = box_iou(ref["bbox"], box)
            records.append(record)
    model.train(was_training)
    records = sorted(_gather(records), key=lambda r: str(r["ref_id"]))
    result = {"num_refs": len(records)}
    for suffix in box_sets:
        result.update(grounding_accuracy([r["split"] for r in records], [r[f"iou{suffix}"] for r in records], suffix))
    return result, records


def write_predictions(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fp:
        json.dump(records, fp)
    os.replace(tmp, path)
