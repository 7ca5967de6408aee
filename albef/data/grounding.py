"""Weakly supervised grounding data (RefCOCO+ as ALBEF prepares it).

Training files are ALBEF's ``refcoco+_train.json``: ``[{"image": path, "text": expression,
"ref_id": int, ...}]``. Only image-text pairs are used; the expressions of one image share its id
(ALBEF keys images by file name), so they are positives of each other in ITC.

Evaluation files are ALBEF's ``refcoco+_val.json`` / ``refcoco+_test.json``
(``{"image", "text", "ref_id"}``) whose references carry, either in the entry itself or in a
``grounding.refs_file`` JSON ``{"<ref_id>": {...}}``, the fields ALBEF's evaluation takes from the
REFER toolkit:

* ``image_id``: the key of the image's boxes in the detection file;
* ``bbox``: the ground-truth box ``[x, y, w, h]`` in pixels of the original image;
* ``split``: ``val``, ``testA`` or ``testB``.

Detection files are ALBEF's ``dets.json`` (Mask R-CNN proposals of MAttNet) and ``cocos.json``
(the COCO boxes): ``{"<image_id>": [[x, y, w, h, ...], ...]}``; extra values per box are ignored.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .captions import pre_caption
from .datasets import AnnotationError, CaptionDataset, SampleError, read_image

SPLITS = ("val", "testA", "testB")
REF_FIELDS = ("image_id", "bbox", "split")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fp:
            return json.load(fp)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: not a readable JSON file ({e})") from None


def grounding_train_annotations(files: Sequence[str]) -> list[dict]:
    """Training expressions as caption samples ``{"image", "caption", "id"}``.

    The id numbers the image's file name in order of first appearance, as ALBEF's
    ``grounding_dataset`` does, so every expression of an image is a positive of the others.
    """
    samples: list[dict] = []
    ids: dict[str, int] = {}
    for path in files:
        data = _read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a JSON list of {{image, text, ref_id}} entries")
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                    or not isinstance(entry.get("text"), str):
                raise AnnotationError(f"{path}: entry {i} needs string 'image' and 'text' fields")
            image_id = ids.setdefault(os.path.basename(entry["image"]), len(ids))
            samples.append({"image": entry["image"], "caption": entry["text"], "id": image_id})
    return samples


class GroundingTrainDataset(CaptionDataset):
    """Expression-image pairs of grounding training files, read as caption samples."""

    def __init__(self, files: Sequence[str], image_root: str, transform: Callable, max_words: int = 30,
                 seed: int = 0):
        super().__init__([], image_root, transform, max_words, seed)
        self.samples = grounding_train_annotations(files)


def _check_box(box: Any, where: str) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) < 4 or not all(isinstance(v, (int, float)) for v in box[:4]):
        raise AnnotationError(f"{where}: expected a box [x, y, w, h, ...] of numbers, got {str(box)[:60]}")
    return [float(v) for v in box[:4]]


def load_refs(files: Sequence[str], refs_file: str | None = None) -> list[dict]:
    """Evaluation references ``{"image", "text", "ref_id", "image_id", "bbox", "split"}``.

    Fields missing from an entry are taken from `refs_file` by ref_id; a reference that still
    lacks one is an `AnnotationError` naming the file, entry and field.
    """
    extra = {}
    if refs_file:
        data = _read_json(refs_file)
        if not isinstance(data, dict):
            raise AnnotationError(f"{refs_file}: expected a mapping {{ref_id: {{image_id, bbox, split}}}}")
        extra = {str(k): v for k, v in data.items()}
    refs = []
    for path in files:
        data = _read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a JSON list of {{image, text, ref_id}} entries")
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                    or not isinstance(entry.get("text"), str) or "ref_id" not in entry:
                raise AnnotationError(f"{where} needs 'image', 'text' and 'ref_id' fields")
            ref = {**extra.get(str(entry["ref_id"]), {}), **entry}
            missing = [f for f in REF_FIELDS if f not in ref]
            if missing:
                source = f" or in grounding.refs_file ({refs_file})" if refs_file else " (or set grounding.refs_file)"
                raise AnnotationError(f"{where} (ref_id {entry['ref_id']}) lacks {missing}; give them in the entry{source}")
            if ref["split"] not in SPLITS:
                raise AnnotationError(f"{where}: split must be one of {SPLITS}, got {ref['split']!r}")
            ref["bbox"] = _check_box(ref["bbox"], f"{where}: bbox")
            refs.append(ref)
    return refs


def load_boxes(path: str) -> dict[str, list[list[float]]]:
    """A detection / COCO box file: ``{str(image_id): [[x, y, w, h], ...]}`` (extra values dropped)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a mapping {{image_id: [[x, y, w, h, ...], ...]}}")
    boxes = {}
    for image_id, dets in data.items():
        if not isinstance(dets, list):
            raise AnnotationError(f"{path}: image {image_id}: expected a list of boxes")
        boxes[str(image_id)] = [_check_box(d, f"{path}: image {image_id}") for d in dets]
    return boxes


class GroundingEvalError(RuntimeError):
    """An evaluation image cannot be read (grounding needs every reference's image)."""


class GroundingEvalDataset(Dataset):
    """References -> ``(image tensor, cleaned expression, index, (width, height))``.

    The width and height are those of the original image, to which the Grad-CAM map is upsampled
    (the boxes are in its pixels).
    """

    def __init__(self, refs: Sequence[dict], image_root: str, transform: Callable, max_words: int = 30):
        self.refs = list(refs)
        self.image_root = image_root
        self.transform = transform
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int, tuple[int, int]]:
        ref = self.refs[index]
        try:
            image = read_image(os.path.join(self.image_root, ref["image"]))
        except SampleError as e:
            raise GroundingEvalError(f"eval image {e.detail} ({e.reason}); check eval.image_root and the eval files") from e
        return self.transform(image), pre_caption(ref["text"], self.max_words), index, image.size


def collate_eval(batch: Sequence[tuple]) -> tuple[torch.Tensor, list[str], list[int], list[tuple[int, int]]]:
    images, texts, indices, sizes = zip(*batch)
    return torch.stack(images), list(texts), list(indices), list(sizes)


# ----------------------------------------------------------------------------- REFER -> refs_file


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles containers, strings and numbers only: any global (class, function) is refused,
    so reading the file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing '{module}.{name}': only plain data is read from this file")


def read_refer_refs(path: str) -> list[dict]:
    """The references of a REFER ``refs(<splitBy>).p`` (a Python 2 pickle of plain dicts and
    lists), read without running anything, or AnnotationError."""
    try:
        with open(path, "rb") as fp:
            refs = _PlainDataUnpickler(fp, encoding="latin1").load()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        raise AnnotationError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:  # damaged pickles fail many ways
        raise AnnotationError(f"{path}: not a readable REFER refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise AnnotationError(f"{path}: expected a list of references (dicts), as REFER's refs(unc).p")
    return refs


def refer_refs_file(refs_pickle: str, instances_json: str) -> dict[str, dict]:
    """`grounding.refs_file` content from the REFER toolkit's files: ``{"<ref_id>": {"image_id",
    "bbox", "split"}}``, the box being the COCO annotation ``ann_id`` of the reference in
    ``instances.json`` (REFER's ``refToAnn``)."""
    instances = _read_json(instances_json)
    if not isinstance(instances, dict) or not isinstance(instances.get("annotations"), list):
        raise AnnotationError(f"{instances_json}: expected REFER's instances.json with an 'annotations' list")
    boxes = {}
    for i, ann in enumerate(instances["annotations"]):
        where = f"{instances_json}: annotation {i}"
        if not isinstance(ann, dict) or not _is_id(ann.get("id")) or "bbox" not in ann:
            raise AnnotationError(f"{where}: expected an object with an integer 'id' and a 'bbox' "
                                  f"(got {str(ann)[:60]})")
        boxes[ann["id"]] = _check_box(ann["bbox"], f"{where} (id {ann['id']}): bbox")
    out = {}
    for i, ref in enumerate(read_refer_refs(refs_pickle)):
        missing = [k for k in ("ref_id", "ann_id", "image_id", "split") if k not in ref]
        if missing:
            raise AnnotationError(f"{refs_pickle}: reference {i} has no {', '.join(missing)}")
        wrong = [f"{k} {str(ref[k])[:30]!r}" for k in ("ref_id", "ann_id", "image_id") if not _is_id(ref[k])]
        wrong += [f"split {str(ref['split'])[:30]!r}"] if not isinstance(ref["split"], str) else []
        if wrong:
            raise AnnotationError(f"{refs_pickle}: reference {i}: ref_id, ann_id and image_id must be integers and "
                                  f"split a string (got {', '.join(wrong)})")
        if ref["ann_id"] not in boxes:
            raise AnnotationError(f"{refs_pickle}: reference {ref['ref_id']} names annotation {ref['ann_id']}, "
                                  f"which {instances_json} does not have")
        out[str(ref["ref_id"])] = {"image_id": ref["image_id"], "bbox": boxes[ref["ann_id"]], "split": ref["split"]}
    return out


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m albef.data.grounding --refs "refs(unc).p" --instances instances.json --out refs.json``:
    write the `grounding.refs_file` of a REFER dataset (RefCOCO+: refcoco+/refs(unc).p)."""
    parser = argparse.ArgumentParser(prog="python -m albef.data.grounding",
                                     description="REFER refs pickle + instances.json -> grounding.refs_file JSON")
    parser.add_argument("--refs", required=True, help="REFER refs(<splitBy>).p, e.g. refcoco+/refs(unc).p")
    parser.add_argument("--instances", required=True, help="the dataset's instances.json")
    parser.add_argument("--out", required=True, help="the JSON to write (set grounding.refs_file to it)")
    args = parser.parse_args(argv)
    try:
        refs = refer_refs_file(args.refs, args.instances)
    except AnnotationError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        with open(args.out, "w", encoding="utf-8") as fp:
            json.dump(refs, fp)
    except OSError as e:
        print(f"error: --out {args.out}: cannot write it ({e.strerror or e})", file=sys.stderr, flush=True)
        return 2
    splits = Counter(ref["split"] for ref in refs.values())
    print(f"wrote {args.out}: {len(refs)} references ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
