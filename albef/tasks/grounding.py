"""Weakly supervised visual grounding (RefCOCO+), as ALBEF's `Grounding.py`.

    albef-grounding --config configs/grounding.yaml --init-from ALBEF.pth --output-dir DIR
    albef-grounding --config configs/grounding.yaml --init-from DIR/best.pt --evaluate
    albef-grounding --config configs/grounding.yaml --init-from DIR/best.pt --visualize
    albef-grounding --config configs/grounding.yaml --init-from CKPT --visualize --image x.jpg --text "..."

Training is retrieval fine-tuning (ITC + ITM) on referring expressions paired with their whole
image; no box is ever seen. Evaluation localises each expression with Grad-CAM on the ITM score
(`albef.gradcam`, BERT layer `grounding.block_num`; with `grounding.gradcam_mode: itc`, on the ITC
similarity through ViT block `block_num`), upsamples the map to the original image, scores
every detection box of the image by ``map[box].sum() / area ** box_alpha`` and counts the
expression as found when the best box has IoU >= 0.5 with the true box; accuracy per split
(``val_d``, ``testA_d``, ``testB_d``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from albef.cli import USER_ERRORS, build_parser, evaluation_weights
from albef.config import Config, ConfigError, check_paths, load_config
from albef.data.captions import pre_caption
from albef.data.datasets import AnnotationError, SampleError, preflight_files, read_image
from albef.data.grounding import (
    SPLITS,
    GroundingEvalDataset,
    GroundingEvalError,
    GroundingTrainDataset,
    collate_eval,
    grounding_train_annotations,
    load_boxes,
    load_refs,
)
from albef.data.transforms import eval_transform, train_transform
from albef.dist import DistInfo, destroy_distributed, init_distributed
from albef.engine.evaluation import eval_files, gather_lists, progress, shard_subset, stoppable
from albef.engine.results import COUNT, unit_of
from albef.engine.trainer import init_weights, seed_everything
from albef.gradcam import check_block_num, gradcam, gradcam_token_maps, itc_gradcam, upsample_map
from albef.metrics import IOU_THRESHOLD, box_iou, chance_accuracy, grounding_accuracy, pick_box
from albef.models import build_tokenizer
from albef.tasks.pretrain import unwrap
from albef.tasks.base import register_task
from albef.tasks.retrieval import RetrievalTask
from albef.visualize import gradcam_figure, save_png


@dataclass
class GroundingConfig:
    """Weakly supervised grounding (albef-grounding): Grad-CAM layer and box files."""
    gradcam_mode: Literal["itm", "itc"] = "itm"  # ALBEF's --gradcam_mode: ITM via cross-attention | ITC via ViT
    block_num: int = 8  # itm: BERT layer (absolute index, a fusion layer) whose cross-attention Grad-CAM
    #                     reads; itc: the ViT block whose self-attention it reads
    det_file: str = "data/refcoco+/dets.json"  # {image_id: [[x, y, w, h, ...], ...]} candidate boxes
    coco_file: str | None = None  # optional second box file (ALBEF's cocos.json): adds {split}_gt accuracies
    refs_file: str | None = None  # {ref_id: {image_id, bbox, split}} for eval entries that lack them
    box_alpha: float = 0.5  # box score = map[box].sum() / area ** box_alpha
    visualize_count: int = 16  # references drawn by --visualize


# ----------------------------------------------------------------------------- evaluation


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int, device) -> tuple[Tensor, Tensor]:
    tokens = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def evaluate_grounding(model, tokenizer, cfg, files: Sequence[str], device) -> tuple[dict[str, float], list[dict]]:
    """Grad-CAM grounding accuracy of `model` on the references of `files`.

    Runs on every rank (each takes a contiguous block of the references) and returns, on every rank, the
    accuracies (``{split}_d`` with `grounding.det_file`'s boxes, ``{split}_gt`` with
    `grounding.coco_file`'s when set, each with the random-pick level ``{split}_d_chance``, ...,
    and ``num_refs``) and one prediction per reference.
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
    shard = shard_subset(dataset)
    loader = DataLoader(shard, batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                        collate_fn=collate_eval, pin_memory=torch.device(device).type == "cuda")
    was_training = model.training
    model.eval()
    records = []
    with progress(len(shard), "grounding: Grad-CAM", "ref") as bar:
        for images, texts, indices, sizes in stoppable(loader, len(loader)):
            bar.update(len(indices))
            input_ids, attention_mask = tokenize(tokenizer, texts, cfg.eval.max_tokens, device)
            cams = gradcam(model, images.to(device), input_ids, attention_mask, gcfg.block_num,
                           gcfg.gradcam_mode).float()
            for cam, index, (width, height) in zip(cams, indices, sizes):
                ref = refs[index]
                heat = upsample_map(cam, height, width)
                record = {"ref_id": ref["ref_id"], "split": ref["split"]}
                for suffix, boxes in box_sets.items():
                    candidates = boxes[str(ref["image_id"])]
                    box = candidates[pick_box(heat, candidates, gcfg.box_alpha)]
                    record[f"box{suffix}"] = box
                    record[f"iou{suffix}"] = box_iou(ref["bbox"], box)
                    hits = sum(box_iou(ref["bbox"], c) >= IOU_THRESHOLD for c in candidates)
                    record[f"chance{suffix}"] = hits / len(candidates)
                records.append(record)
    model.train(was_training)
    records = sorted(gather_lists(records), key=lambda r: str(r["ref_id"]))
    result = {"num_refs": len(records)}
    for suffix in box_sets:
        splits = [r["split"] for r in records]
        result.update(grounding_accuracy(splits, [r[f"iou{suffix}"] for r in records], suffix))
        result.update(chance_accuracy(splits, [r[f"chance{suffix}"] for r in records], suffix))
    return result, records


def write_predictions(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fp:
        json.dump(records, fp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- pictures


def draw_grounding(
    model, tokenizer, cfg, image: Image.Image, text: str, device, boxes=None, true_box=None
) -> tuple[np.ndarray, list[float] | None]:
    """The Grad-CAM picture of one image and expression (ALBEF's visualisation notebook): the image,
    the expression's map with the box it picks among `boxes` (when given) and `true_box`, and one
    map per word. Returns (RGB uint8 picture, chosen box or None)."""
    transform = eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std)
    caption = pre_caption(text, cfg.data.max_words)
    input_ids, attention_mask = tokenize(tokenizer, [caption], cfg.eval.max_tokens, device)
    was_training = model.training
    model.eval()
    pixels = transform(image)[None].to(device)
    if cfg.grounding.gradcam_mode == "itc":  # one map per expression, no word maps
        cams, sim = itc_gradcam(model, pixels, input_ids, attention_mask, cfg.grounding.block_num)
        cosine = sim[0].item() * unwrap(model).temp.item()  # sim is i . t / temp
        cam, token_maps, words, score = cams[0].float().cpu(), None, (), f"ITC cosine {cosine:.2f}"
    else:
        token_maps, logits = gradcam_token_maps(model, pixels, input_ids, attention_mask, cfg.grounding.block_num)
        token_maps = token_maps[0].float().cpu()
        cam = token_maps.mean(dim=0)
        words = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())[1:-1]  # between [CLS] and [SEP]
        token_maps = token_maps[1 : 1 + len(words)].numpy()
        score = f"ITM match {logits.float().softmax(dim=-1)[0, 1].item():.2f}"
    model.train(was_training)
    box = None
    if boxes:
        box = boxes[pick_box(upsample_map(cam, image.height, image.width), boxes, cfg.grounding.box_alpha)]
    picture = gradcam_figure(image, f"{caption}   ({score})", cam.numpy(), box=box, true_box=true_box,
                             token_maps=token_maps, tokens=words)
    return picture, box


# ----------------------------------------------------------------------------- task


def check_reference_boxes(refs: list[dict], image_root: str) -> None:
    """One line (AnnotationError) naming the references, by ref_id, whose box [x, y, w, h] has no
    area or lies (by more than a pixel) outside its image: they could only be scored as misses."""
    from PIL import Image

    sizes: dict[str, tuple[int, int]] = {}
    bad = []
    for ref in refs:
        path = os.path.join(image_root, ref["image"])
        if path not in sizes:
            with Image.open(path) as image:  # the preflight has decoded it: the header is enough
                sizes[path] = image.size
        (width, height), (x, y, w, h) = sizes[path], ref["bbox"]
        if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            bad.append(str(ref["ref_id"]))
    if bad:
        raise AnnotationError(f"{len(bad)} evaluation reference(s) have a box without area or outside their image "
                              f"(ref_id {', '.join(bad[:10])}{', ...' if len(bad) > 10 else ''}); fix their bbox "
                              "in the eval files or grounding.refs_file, or remove them")


@register_task("grounding", help="weakly supervised visual grounding (Grad-CAM)")
class GroundingTask(RetrievalTask):
    """ALBEF's grounding model is its retrieval model: the retrieval fine-tuning step (ITC + ITM,
    every expression of an image a positive) on expression-image pairs, ALBEF's retrieval
    loading rule for `--init-from`; evaluation is Grad-CAM box picking, best.pt by `val_d`."""

    best_metric = "val_d"
    description = "ALBEF weakly supervised grounding: fine-tuning and Grad-CAM evaluation (RefCOCO+)"
    flags = {}  # retrieval's --save-examples does not apply
    config_section, config_class = "grounding", GroundingConfig
    config_ranges = {"block_num": "[0, inf)", "box_alpha": "[0, inf)", "visualize_count": "[1, inf)"}

    @classmethod
    def main(cls, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        """`albef-grounding --config CFG [--init-from PATH] [--evaluate | --visualize [--image P --text T]] [...]`."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--visualize" in argv:
            return visualize(argv)
        return super().main(argv, prog)

    def check(self, cfg: Config, training: bool = True) -> None:
        """Before anything is built: no MLM term, and every grounding file is well-formed."""
        if cfg.loss.weights.mlm:
            raise ConfigError("loss.weights.mlm: grounding trains ALBEF's retrieval model, which has no MLM term; "
                              "set loss.weights.mlm=0")
        if training and cfg.data.format != "json":
            raise ConfigError("data.format: grounding reads its JSON expression files; set data.format=json")
        if training:
            grounding_train_annotations(cfg.data.train_files)
        refs = []
        for key in ("val_files", "test_files"):  # every image read as evaluation reads it: none may fail
            refs += preflight_files(getattr(cfg.eval, key), lambda f: load_refs(f, cfg.grounding.refs_file),
                                    lambda ref: [ref["image"]], cfg.eval.image_root, f"eval.{key}", 0.0)
        if refs:
            boxes = {path: load_boxes(path) for path in (cfg.grounding.det_file, cfg.grounding.coco_file) if path}
            dets = boxes[cfg.grounding.det_file]
            uncovered = sorted({str(ref["image_id"]) for ref in refs} - dets.keys())
            if uncovered:
                raise AnnotationError(f"{cfg.grounding.det_file}: no boxes for {len(uncovered)} evaluation image(s) "
                                      f"(image_id {', '.join(uncovered[:5])}{', ...' if len(uncovered) > 5 else ''}); "
                                      "grounding.det_file must cover every image of eval.val_files / eval.test_files")
            check_reference_boxes(refs, cfg.eval.image_root)

    def build_model(self, cfg: Config) -> nn.Module:
        model = super().build_model(cfg)
        try:
            check_block_num(model, cfg.grounding.block_num, cfg.grounding.gradcam_mode)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return model

    def build_train_dataset(self, cfg: Config):
        """ALBEF's grounding augmentation: the whole image resized (no crop), flip, RandAugment."""
        d = cfg.data
        transform = train_transform(cfg.model.vision.image_size, d.mean, d.std, d.crop_scale, d.randaugment,
                                    d.hflip, crop=False, jpeg_draft=d.jpeg_draft, decode=d.decode)
        return GroundingTrainDataset(d.train_files, d.image_root, transform, d.max_words, cfg.seed)

    def evaluate(self, model: nn.Module, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        """Grad-CAM grounding accuracy on eval.val_files / eval.test_files; the picked boxes go to
        OUTPUT_DIR/results/grounding_{split}.json."""
        model = unwrap(model)
        fractions, records = evaluate_grounding(model, build_tokenizer(cfg.model), cfg, eval_files(cfg, split), dist.device)
        # in % as every task's results (albef/engine/results.py); num_refs stays a count
        result = {k: v if unit_of(k) == COUNT else 100.0 * v for k, v in fractions.items()}
        if dist.rank == 0:
            write_predictions(records, os.path.join(cfg.output_dir, "results", f"grounding_{split}.json"))
        return result

    def format_result(self, result: dict[str, float]) -> str:
        rows = [f"{'boxes':12s}" + "".join(f"{split:>8s}" for split in SPLITS)]
        for suffix, label in (("_d", "detections"), ("_d_chance", "  chance"), ("_gt", "coco boxes"),
                              ("_gt_chance", "  chance")):
            if any(f"{split}{suffix}" in result for split in SPLITS):
                cells = [f"{result[f'{s}{suffix}']:8.2f}" if f"{s}{suffix}" in result else f"{'-':>8s}"
                         for s in SPLITS]
                rows.append(f"{label:12s}" + "".join(cells))
        rows.append(f"accuracy (%) at IoU >= {IOU_THRESHOLD}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------- --visualize


def _visualize_parser() -> argparse.ArgumentParser:
    parser = build_parser("albef-grounding --visualize", "Grad-CAM heat maps of expressions (PNG + TensorBoard)")
    parser.add_argument("--visualize", action="store_true", help="draw Grad-CAM pictures instead of training")
    parser.add_argument("--image", help="an image to explain (default: the first grounding.visualize_count "
                        "references of eval.val_files, else eval.test_files)")
    parser.add_argument("--text", action="append", default=[], help="an expression for --image (repeatable)")
    return parser


def visualize(argv: Sequence[str] | None) -> int:
    """`albef-grounding --visualize`: heat-map pictures of any pretraining or retrieval /
    grounding checkpoint, to OUTPUT_DIR/gradcam/*.png and TensorBoard (OUTPUT_DIR/tb, images
    `gradcam/N`). Returns the exit code."""
    try:
        args = _visualize_parser().parse_intermixed_args(argv)
        cfg = load_config(args.config, args.overrides)
        if args.output_dir:
            cfg.output_dir = args.output_dir
        if args.init_from:
            cfg.model.init_checkpoint = args.init_from
        check_paths(cfg, training=False)
        if bool(args.image) != bool(args.text):
            raise ConfigError("--image and --text go together: give an image and at least one expression")
        if args.image:
            image = read_image(args.image)
            items = [(image, text, None, None, Path(args.image).stem) for text in args.text]
        else:
            items = _reference_items(cfg)
        weights = evaluation_weights(cfg)
        if weights is None:
            raise ConfigError(f"no weights to explain: pass --init-from PATH (nothing in {cfg.output_dir})")
        task = GroundingTask()
        seed_everything(cfg.seed)
        model = task.build_model(cfg)
        init_weights(task, model, weights, cfg)
    except (*USER_ERRORS, SampleError, GroundingEvalError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2

    device = init_distributed().device
    model.to(device)
    tokenizer = build_tokenizer(cfg.model)
    out_dir = Path(cfg.output_dir) / "gradcam"
    writer = SummaryWriter(str(Path(cfg.output_dir) / "tb"))
    try:
        for n, (image, text, boxes, true_box, name) in enumerate(items):
            picture, box = draw_grounding(model, tokenizer, cfg, image, text, device, boxes, true_box)
            path = out_dir / f"{n:03d}_{name}.png"
            save_png(picture, str(path))
            writer.add_image(f"gradcam/{n:03d}", picture, 0, dataformats="HWC")
            hit = "" if box is None or true_box is None else f"  IoU {box_iou(true_box, box):.2f}"
            print(f"{path}: {text!r}{hit}", flush=True)
    finally:
        writer.close()
        destroy_distributed()
    return 0


def _reference_items(cfg: Config) -> list[tuple]:
    """(image, text, candidate boxes, true box, name) of the first references to draw."""
    files = cfg.eval.val_files or cfg.eval.test_files
    if not files:
        raise ConfigError("nothing to draw: give --image and --text, or eval.val_files / eval.test_files")
    refs = load_refs(files, cfg.grounding.refs_file)[: cfg.grounding.visualize_count]
    dets = load_boxes(cfg.grounding.det_file)
    items = []
    for ref in refs:
        try:
            image = read_image(os.path.join(cfg.eval.image_root, ref["image"]))
        except SampleError as e:
            raise GroundingEvalError(f"eval image {e.detail} ({e.reason}); check eval.image_root") from e
        items.append((image, ref["text"], dets.get(str(ref["image_id"])), ref["bbox"], f"ref{ref['ref_id']}"))
    return items


def main(argv: Sequence[str] | None = None) -> int:
    return GroundingTask.main(argv, "albef-grounding")


if __name__ == "__main__":
    sys.exit(main())
