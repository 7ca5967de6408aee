"""Retrieval examples as pictures (`eval.save_examples` N, `albef-retrieval --save-examples N`).

For N held-out captions, the top-5 images; for N images, the top-5 captions; ranked by the final
score (the ITM logit of the re-ranked top-k, then, when k < 5, the rest by ITC similarity),
correct ones marked green with a tick, wrong ones red. Written as PNG to
OUTPUT_DIR/examples/{split}/ and as images to TensorBoard (OUTPUT_DIR/tb, tag `{split}_examples/...`).
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from albef.data.datasets import read_image

if TYPE_CHECKING:
    from albef.tasks.retrieval_eval import RetrievalScores

TOP = 5  # candidates shown per query
DPI = 100
TEXT_QUERY_INCHES = (10.0, 2.8)  # caption on top, TOP images below: 1000 x 280 px
IMAGE_QUERY_INCHES = (10.0, 2.8)  # the image on the left, TOP captions on the right
RIGHT, WRONG = "#1a9850", "#d73027"


def _render(fig: Figure) -> np.ndarray:
    """The figure as an RGB array [H, W, 3] (uint8) of exactly figsize * DPI pixels."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def text_query_figure(caption: str, images: list[Image.Image], correct: list[bool], scores: list[str]) -> np.ndarray:
    """One caption and its ranked images (green frame and tick = an image of the caption)."""
    fig = Figure(figsize=TEXT_QUERY_INCHES, dpi=DPI)
    fig.suptitle(textwrap.shorten(f"query: {caption}", 140), fontsize=10)
    for rank, (image, ok, score) in enumerate(zip(images, correct, scores)):
        ax = fig.add_axes((0.01 + rank * 0.198, 0.02, 0.18, 0.74))
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        colour = RIGHT if ok else WRONG
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
        ax.set_title(f"{rank + 1}. {'✓' if ok else '✗'} {score}", fontsize=9, color=colour)
    return _render(fig)


def image_query_figure(image: Image.Image, captions: list[str], correct: list[bool], scores: list[str]) -> np.ndarray:
    """One image and its ranked captions (green with a tick = a caption of the image)."""
    fig = Figure(figsize=IMAGE_QUERY_INCHES, dpi=DPI)
    ax = fig.add_axes((0.01, 0.04, 0.24, 0.86))
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("query image", fontsize=9)
    for rank, (caption, ok, score) in enumerate(zip(captions, correct, scores)):
        line = f"{rank + 1}. {'✓' if ok else '✗'} ({score}) {textwrap.shorten(caption, 90)}"
        fig.text(0.28, 0.85 - rank * 0.17, line, fontsize=9, color=RIGHT if ok else WRONG, va="center")
    return _render(fig)


def _top(itm: torch.Tensor, sims: torch.Tensor) -> tuple[list[int], list[str]]:
    """The TOP best candidates of one query: the re-ranked ones by ITM logit, then the others
    (scored -100) by ITC similarity; and their score labels."""
    reranked = itm > -100
    order = torch.where(reranked, itm + 1e6, sims).argsort(descending=True)[:TOP].tolist()
    # ALBEF re-ranks by the ITM head's 'match' logit (not a probability: it can be negative)
    labels = [f"itm logit {itm[c]:.2f}" if reranked[c] else f"itc sim {sims[c]:.2f}" for c in order]
    return order, labels


def _spread(count: int, n: int) -> list[int]:
    """`n` indices spread evenly over range(count) (all of them when n >= count)."""
    if n >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})


def save_retrieval_examples(scores: RetrievalScores, n: int, output_dir: Path, split: str,
                            global_step: int | None = None) -> list[Path]:
    """Write the grids of `n` text and `n` image queries of `split`; returns the PNG paths."""
    from torch.utils.tensorboard import SummaryWriter

    data = scores.dataset
    out = Path(output_dir) / "examples" / split
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[int, Image.Image] = {}

    def picture(index: int) -> Image.Image:
        if index not in cache:
            cache[index] = read_image(os.path.join(data.image_root, data.images[index]))
        return cache[index]

    pictures: list[tuple[str, np.ndarray]] = []
    for t in _spread(len(data.texts), n):
        top, labels = _top(scores.t2i[t], scores.sims[:, t])
        correct = [i == data.txt2img[t] for i in top]
        pictures.append((f"text_to_image_{t:06d}", text_query_figure(
            data.texts[t], [picture(i) for i in top], correct, labels)))
    for i in _spread(len(data), n):
        top, labels = _top(scores.i2t[i], scores.sims[i])
        correct = [t in data.img2txt[i] for t in top]
        pictures.append((f"image_to_text_{i:06d}", image_query_figure(
            picture(i), [data.texts[t] for t in top], correct, labels)))

    paths = []
    writer = SummaryWriter(str(Path(output_dir) / "tb"))
    try:
        for name, rgb in pictures:
            path = out / f"{name}.png"
            Image.fromarray(rgb).save(path)
            paths.append(path)
            writer.add_image(f"{split}_examples/{name}", torch.from_numpy(rgb), global_step, dataformats="HWC")
    finally:
        writer.close()
    return paths
