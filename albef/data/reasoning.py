"""Visual reasoning data: SNLI-VE (image, sentence, 3-way label) and NLVR2 (two images, sentence,
true/false), in ALBEF's annotation formats; the tokenising collate adds ``labels``.

    VE:    [{"image": "1234.jpg" | "1234", "sentence": str, "label": "entailment" | "neutral" | "contradiction"}]
           (an image name without an extension gets ".jpg", as ALBEF's ve_dataset)
    NLVR2: [{"images": [path0, path1], "sentence": str, "label": true | false | "True" | "False"}]

Samples are ``{image, caption, label, id, index}`` (NLVR2: ``image`` is [2, 3, H, W]) or a
`BadSample`; the per-sample augmentation seed is (seed, epoch, index, image number), so each of
the two NLVR2 images gets its own crop/flip, as in ALBEF.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .captions import pre_caption
from .collate import Collator
from .datasets import AnnotationError, BadSample, EpochDataset, SampleError, read_image, sample_seed

VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}  # ALBEF's ve_dataset ids
NLVR_LABELS = {False: 0, True: 1, "False": 0, "True": 1, "false": 0, "true": 1}


def _read_list(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
    except FileNotFoundError as exn:
        raise AnnotationError(f"{path}: annotation file not found") from exn
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise AnnotationError(f"{path}: not a UTF-8 JSON file ({exn})") from exn
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _sentence(entry: dict, where: str) -> str:
    if not isinstance(entry.get("sentence"), str) or not entry["sentence"].strip():
        raise AnnotationError(f"{where}: 'sentence' must be a non-empty string")
    return entry["sentence"]


def load_ve_annotations(files: str | Sequence[str]) -> list[dict]:
    """Validated VE entries as ``{images: [path], sentence, label: int}``."""
    samples = []
    for path in [files] if isinstance(files, str) else files:
        for i, entry in enumerate(_read_list(path)):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
                raise AnnotationError(f"{where}: expected an object with 'image' (a path), 'sentence' and 'label'")
            if entry.get("label") not in VE_LABELS:
                raise AnnotationError(f"{where}: 'label' must be one of {', '.join(VE_LABELS)} (got {entry.get('label')!r})")
            image = entry["image"] if os.path.splitext(entry["image"])[1] else entry["image"] + ".jpg"
            samples.append({"images": [image], "sentence": _sentence(entry, where), "label": VE_LABELS[entry["label"]]})
    return samples


def load_nlvr_annotations(files: str | Sequence[str]) -> list[dict]:
    """Validated NLVR2 entries as ``{images: [path0, path1], sentence, label: 0 | 1}``."""
    samples = []
    for path in [files] if isinstance(files, str) else files:
        for i, entry in enumerate(_read_list(path)):
            where = f"{path}: entry {i}"
            images = entry.get("images") if isinstance(entry, dict) else None
            if not (isinstance(images, list) and len(images) == 2 and all(isinstance(p, str) and p for p in images)):
                raise AnnotationError(f"{where}: expected an object with 'images' (a list of two paths), 'sentence' and 'label'")
            label = entry.get("label")
            if isinstance(label, int) and not isinstance(label, bool) or label not in NLVR_LABELS:
                raise AnnotationError(f"{where}: 'label' must be true or false (got {label!r})")
            samples.append({"images": list(images), "sentence": _sentence(entry, where), "label": NLVR_LABELS[label]})
    return samples


class ReasoningDataset(EpochDataset):
    """VE (`kind="ve"`) or NLVR2 (`kind="nlvr"`) annotations over image files."""

    def __init__(
        self,
        kind: str,
        files: str | Sequence[str],
        image_root: str,
        transform: Callable,
        max_words: int = 30,
        seed: int = 0,
    ) -> None:
        loaders = {"ve": load_ve_annotations, "nlvr": load_nlvr_annotations}
        if kind not in loaders:
            raise ValueError(f"kind must be one of {tuple(loaders)}, got {kind!r}")
        super().__init__(loaders[kind](files), transform, seed)
        self.kind = kind
        self.image_root = image_root
        self.max_words = max_words

    @property
    def labels(self) -> list[int]:
        return [s["label"] for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        ann = self.samples[index]
        sentence = pre_caption(ann["sentence"], self.max_words)
        if not sentence.strip():
            return BadSample("empty_caption", index, f"sentence {ann['sentence']!r} is empty after cleaning")
        pixels = []
        epoch = self.epoch.get()
        for number, name in enumerate(ann["images"]):
            path = os.path.join(self.image_root, name)
            try:
                image = read_image(path)
            except SampleError as exn:
                return BadSample(exn.reason, index, exn.detail)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, 2 * index + number))
                pixels.append(self.transform(image))
        image = pixels[0] if self.kind == "ve" else torch.stack(pixels)
        return {"image": image, "caption": sentence, "label": ann["label"], "id": index, "index": index}


class LabelCollator(Collator):
    """The caption `Collator` plus ``labels`` long [B]."""

    def __call__(self, samples: Sequence[dict | BadSample]) -> dict:
        batch = super().__call__(samples)
        batch["labels"] = torch.tensor([s["label"] for s in samples if not isinstance(s, BadSample)], dtype=torch.long)
        return batch
