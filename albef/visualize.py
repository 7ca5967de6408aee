"""Grad-CAM heat-map pictures: ALBEF's `visualization.ipynb` overlay, as PNG and TensorBoard images.

`heatmap_overlay` follows the notebook's `getAttMap`: min-max normalise the map, resize it to the
image bicubically, blur it with a Gaussian of sigma 2% of the longer image side, normalise again,
colour it with the `jet` map and blend it over the image with weight `map ** 0.7`.
`gradcam_figure` lays out one picture: the image, the overlay with the chosen (and the true) box,
and optionally one overlay per word, under the expression as title.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torchvision.transforms.v2.functional import gaussian_blur

PANEL_INCHES = 3.0  # each panel is PANEL_INCHES square; the title adds TITLE_INCHES
TITLE_INCHES = 0.5


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.min()
    peak = x.max()
    return x / peak if peak > 0 else x


def heatmap_overlay(image: np.ndarray, cam, blur: bool = True) -> np.ndarray:
    """`image` float [H, W, 3] in [0, 1] with the map `cam` [h, w] blended over it -> [H, W, 3]."""
    height, width = image.shape[:2]
    att = _normalise(np.asarray(cam, dtype=np.float64))
    att = F.interpolate(torch.from_numpy(att)[None, None], size=(height, width), mode="bicubic", align_corners=False)
    if blur:  # scipy.ndimage.gaussian_filter's kernel: radius 4 sigma, reflected borders
        sigma = 0.02 * max(height, width)
        radius = min(int(4.0 * sigma + 0.5), min(height, width) - 1)
        att = gaussian_blur(att, [2 * radius + 1] * 2, [sigma, sigma])
    att = np.clip(_normalise(att[0, 0].numpy()), 0.0, 1.0)
    colour = matplotlib.colormaps["jet"](att)[..., :3]
    weight = (att ** 0.7)[..., None]
    return (1.0 - weight) * image + weight * colour


def figure_size(num_panels: int, dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of a `gradcam_figure` with `num_panels` panels."""
    return round(num_panels * PANEL_INCHES * dpi), round((PANEL_INCHES + TITLE_INCHES) * dpi)


def _draw_box(ax, box: Sequence[float], colour: str, style: str) -> None:
    x, y, w, h = box[:4]
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2, linestyle=style))


def gradcam_figure(
    image: Image.Image,
    text: str,
    cam,
    box: Sequence[float] | None = None,
    true_box: Sequence[float] | None = None,
    token_maps=None,
    tokens: Sequence[str] = (),
    dpi: int = 100,
) -> np.ndarray:
    """RGB uint8 [H, W, 3] picture (size `figure_size`): the image, the Grad-CAM overlay with the
    chosen box (red) and the true box (green, dashed), then one overlay per token of `tokens`
    (`token_maps` [len(tokens), h, w]); the expression is the title."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    panels = [("image", rgb, False), ("Grad-CAM", heatmap_overlay(rgb, cam), True)]
    for token, token_map in zip(tokens, [] if token_maps is None else token_maps):
        panels.append((token, heatmap_overlay(rgb, token_map), False))
    width, height = figure_size(len(panels), dpi)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.suptitle(text, fontsize=11, y=1.0 - 0.25 * TITLE_INCHES / (PANEL_INCHES + TITLE_INCHES), va="center")
    top = PANEL_INCHES / (PANEL_INCHES + TITLE_INCHES)
    for i, (label, pixels, boxes) in enumerate(panels):
        ax = fig.add_axes((i / len(panels), 0.0, 1.0 / len(panels), top))
        ax.imshow(np.clip(pixels, 0.0, 1.0))
        ax.set_axis_off()
        ax.text(0.02, 0.98, label, transform=ax.transAxes, va="top", fontsize=9, color="white",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
        if boxes and true_box is not None:
            _draw_box(ax, true_box, "lime", "--")
        if boxes and box is not None:
            _draw_box(ax, box, "red", "-")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(picture: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(picture).save(path)
