"""Image classification data: an ImageFolder-style directory (`root/<class>/*.jpg`) or a JSON
list of `{"image": path, "label": class name}` (paths relative to an image root)."""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from albef.data.datasets import AnnotationError, SampleError, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def read_class_list(path: str) -> list[str]:
    """Class names (or prompt templates) from a JSON list of strings or a text file, one a line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None
    if path.endswith(".json"):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AnnotationError(f"{path}: expected a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise AnnotationError(f"{path}: lists nothing")
    return names


def folder_samples(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(class names = the sorted subdirectories, [(image path, class name)]) of an ImageFolder."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    samples = [(os.path.join(root, c, f), c) for c in classes for f in sorted(os.listdir(os.path.join(root, c)))
               if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise AnnotationError(f"{root}: no images in root/<class>/ subdirectories ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def list_samples(path: str, image_root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(class names in order of first appearance, [(image path, class name)]) of a JSON list."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read a JSON list ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise AnnotationError(f"{path}: expected a non-empty JSON list of {{\"image\": ..., \"label\": ...}}")
    samples = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)):
            raise AnnotationError(f"{path}: entry {i}: expected {{\"image\": path, \"label\": class name}}")
        samples.append((os.path.join(image_root, entry["image"]), entry["label"]))
    return list(dict.fromkeys(label for _, label in samples)), samples


class ClassificationDataset(Dataset):
    """Images of one or more sources (directories or JSON lists) with class indices into
    `classes` (default: the classes the sources name, in order); yields (image, label)."""

    def __init__(self, sources: Sequence[str], image_root: str, transform: Callable,
                 classes: Sequence[str] | None = None):
        found: list[str] = []
        self.samples: list[tuple[str, str]] = []
        for source in sources:
            names, samples = folder_samples(source) if os.path.isdir(source) else list_samples(source, image_root)
            found += [n for n in names if n not in found]
            self.samples += samples
        self.classes = list(classes) if classes else found
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({label for _, label in self.samples} - index.keys())
        if unknown:
            raise AnnotationError(f"{', '.join(sources)}: class(es) {', '.join(unknown[:5])} are not among the "
                                  f"{len(self.classes)} class names given")
        self.labels = [index[label] for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, _ = self.samples[i]
        try:
            image = read_image(path)
        except SampleError as err:
            raise AnnotationError(str(err)) from None
        return self.transform(image), self.labels[i]
