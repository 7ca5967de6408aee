"""The retrieval evaluation data: images and their grouped captions (ALBEF annotation files)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch.utils.data import Dataset

from albef.data.captions import pre_caption
from albef.data.datasets import SampleError, load_annotations, read_image


class RetrievalDataError(RuntimeError):
    """An evaluation image cannot be read (retrieval needs every image of the test set)."""


class RetrievalDataset(Dataset):
    """Images of ALBEF annotation files (`{"image": path, "caption": str | [str, ...]}`).

    Captions of one image (same image id) are grouped. `texts` holds the cleaned captions,
    `txt2img[t]` the image of caption t and `img2txt[i]` the captions of image i.
    """

    def __init__(self, files: Sequence[str], image_root: str, transform, max_words: int):
        by_image: dict[int, list[dict]] = {}
        for sample in load_annotations(files):
            by_image.setdefault(sample["id"], []).append(sample)
        self.image_root = image_root
        self.transform = transform
        self.images = [samples[0]["image"] for samples in by_image.values()]
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for img_idx, samples in enumerate(by_image.values()):
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(samples))))
            self.txt2img += [img_idx] * len(samples)
            self.texts += [pre_caption(s["caption"], max_words) for s in samples]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            image = read_image(os.path.join(self.image_root, self.images[index]))
        except SampleError as e:
            raise RetrievalDataError(f"eval image {e.detail} ({e.reason}); check eval.image_root / eval.*_files") from e
        return self.transform(image)
