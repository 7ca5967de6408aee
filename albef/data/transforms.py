"""Image transforms: ALBEF's pretraining augmentation and the evaluation resize.

The training pipeline is ALBEF's: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment
with ALBEF's ten ops -> tensor -> Normalize. RandAugment is torchvision's, restricted to ALBEF's
op list and re-levelled to ALBEF's magnitudes (level 7 of 10: shear 0.21, translate 7 px,
rotate 21 deg, brightness/sharpness factor 1.36, grey fill 128). As in ALBEF, each of the two
layers picks an op uniformly and applies it with probability 0.5.

Every random draw goes through the torch RNG, so seeding torch before the call fixes the output
(the datasets do that per sample).
"""
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torchvision.transforms import InterpolationMode, v2

from .device_decode import DECODE_MODES

ALBEF_OPS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)
_ALBEF_LEVELS = 11  # magnitude bins 0..10, as ALBEF's MAX_LEVEL = 10
_ALBEF_LEVEL = 7
_ALBEF_FILL = 128


def _enhance_levels(num_bins, height, width):
    # ALBEF: factor = level / 10 * 1.8 + 0.1, applied as 1 + magnitude, never negated
    return torch.linspace(-0.9, 0.9, num_bins)


def _translate_levels(num_bins, height, width):
    # ALBEF: level / 10 * 10 pixels (translate_const = 10), random sign
    return torch.linspace(0.0, 10.0, num_bins)


class AlbefRandAugment(v2.RandAugment):
    """torchvision RandAugment over ALBEF's op list with ALBEF's magnitude scales."""

    _AUGMENTATION_SPACE = {
        **{name: v2.RandAugment._AUGMENTATION_SPACE[name] for name in ALBEF_OPS},
        "Brightness": (_enhance_levels, False),
        "Sharpness": (_enhance_levels, False),
        "TranslateX": (_translate_levels, True),
        "TranslateY": (_translate_levels, True),
    }


def albef_randaugment(num_layers: int = 2, level: int = _ALBEF_LEVEL, prob: float = 0.5) -> v2.Transform:
    """ALBEF's RandomAugment(N, M): N layers, each one random op applied with probability `prob`."""
    layer = AlbefRandAugment(
        num_ops=1, magnitude=level, num_magnitude_bins=_ALBEF_LEVELS,
        interpolation=InterpolationMode.BILINEAR, fill=_ALBEF_FILL,
    )
    return v2.Compose([v2.RandomApply([layer], p=prob) for _ in range(num_layers)])


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float], from_pil: bool = True) -> list[v2.Transform]:
    first = [v2.PILToTensor()] if from_pil else []  # the device path feeds uint8 [3, H, W] tensors
    return first + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


# ----------------------------------------------------------------------------- JPEG draft

JPEG_DRAFT_SCALES = (8, 4, 2, 1)  # the DCT scalings libjpeg decodes at (PIL `Image.draft`)


def jpeg_draft_scale(
    size: tuple[int, int], image_size: int, crop_scale_min: float = 1.0, min_ratio: float = 1.0
) -> int:
    """The largest JPEG reduction (8, 4, 2 or 1) after which every crop the transform can take
    still has at least `image_size` pixels on each side, so the crop is only ever downsampled.

    A JPEG reduced by s decodes to W' x H' = ceil(W/s) x ceil(H/s). RandomResizedCrop draws an
    area fraction a >= crop_scale_min of W'H' and an aspect ratio r in [min_ratio, 1/min_ratio]
    (ALBEF: 3/4..4/3) and crops w = sqrt(a W'H' r), h = sqrt(a W'H' / r); the shorter of the two
    is at least sqrt(crop_scale_min * min_ratio * W'H'). When no such crop fits it falls back to
    a centre crop of about the whole image, whose shorter side is min(W', H'). So the reduction is
    allowed when  crop_scale_min * min_ratio * W'H' >= image_size**2  and  min(W', H') >= image_size.
    For ALBEF's 256 px with scale 0.2 that needs W'H' >= 661**2, i.e. a 2x draft only for images of
    about 1,320 x 1,320 pixels (1.75 Mpx) or more. The eval resize (whole image to S x S) is the
    case crop_scale_min = min_ratio = 1.
    """
    width, height = size
    for scale in JPEG_DRAFT_SCALES:
        w, h = -(-width // scale), -(-height // scale)
        if min(w, h) >= image_size and crop_scale_min * min_ratio * w * h >= image_size**2:
            return scale
    return 1


def jpeg_draft_size(size: tuple[int, int], **limits) -> tuple[int, int] | None:
    """The size to pass to `PIL.Image.draft` for an image of `size` (None: decode at full size).

    PIL picks the largest scale s in (8, 4, 2, 1) with s <= min(W // w, H // h); asking for
    (W // s, H // s) makes it pick exactly `jpeg_draft_scale`'s s."""
    scale = jpeg_draft_scale(size, **limits)
    return None if scale == 1 else (size[0] // scale, size[1] // scale)


def _with_draft(compose: v2.Compose, draft_size: Callable | None, decode: str = "workers") -> v2.Compose:
    """Attach the decode hints the datasets read: ``transform.draft_size`` (None: full decode) and
    ``transform.decode`` ('workers': PIL in the DataLoader workers; 'device': see
    `albef.data.device_decode`)."""
    compose.draft_size = draft_size
    compose.decode = decode
    return compose


# ----------------------------------------------------------------------------- pipelines

def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: Sequence[float] = (0.2, 1.0),
    randaugment: bool = True,
    hflip: bool = True,
    crop: bool = True,
    jpeg_draft: bool = False,
    decode: str = "workers",
) -> v2.Compose:
    """ALBEF pretraining augmentation for RGB PIL images -> normalized float tensor [3, S, S].

    With `decode='device'` (data.decode) the same pipeline takes uint8 [3, H, W] tensors and runs
    on the training device after the batch's JPEGs are decoded there (`albef.data.device_decode`);
    `jpeg_draft` does not apply (the device decodes at full size).

    `crop=False` resizes the whole image to S x S instead of a random resized crop (ALBEF's
    grounding training, whose expressions may name any part of the image). With `jpeg_draft`
    (data.jpeg_draft) the datasets decode large JPEGs at a reduced scale that keeps every
    possible crop at >= `image_size` pixels a side (`jpeg_draft_scale`)."""
    if crop:
        first = v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)
    else:
        first = v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    steps = [first]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment:
        steps.append(albef_randaugment())
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES} (got {decode!r})")
    draft = None
    jpeg_draft = jpeg_draft and decode == "workers"
    if jpeg_draft and crop:
        min_ratio = min(min(first.ratio), 1 / max(first.ratio))
        draft = partial(jpeg_draft_size, image_size=image_size, crop_scale_min=crop_scale[0], min_ratio=min_ratio)
    elif jpeg_draft:  # a whole-image resize needs both sides >= image_size, as eval's
        draft = partial(jpeg_draft_size, image_size=image_size)
    return _with_draft(v2.Compose(steps + _to_normalized_tensor(mean, std, decode == "workers")), draft, decode)


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], jpeg_draft: bool = False
) -> v2.Compose:
    """Deterministic square bicubic resize -> normalized float tensor [3, S, S]."""
    resize = v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    draft = partial(jpeg_draft_size, image_size=image_size) if jpeg_draft else None
    return _with_draft(v2.Compose([resize] + _to_normalized_tensor(mean, std)), draft)
