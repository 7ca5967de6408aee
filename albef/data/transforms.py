"""Image transforms: ALBEF's pretraining augmentation and the evaluation resize.

The training pipeline is ALBEF's: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment
with ALBEF's ten ops -> tensor -> Normalize. RandAugment is torchvision's, restricted to ALBEF's
op list and re-levelled to ALBEF's magnitudes (level 7 of 10: shear 0.21, translate 7 px,
rotate 21 deg, brightness/sharpness factor 1.36, grey fill 128). As in ALBEF, each of the two
layers picks an op uniformly and applies it with probability 0.5.

Every random draw goes through the torch RNG, so seeding torch before the call fixes the output
(the datasets do that per sample).
"""
from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

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


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: Sequence[float] = (0.2, 1.0),
    randaugment: bool = True,
    hflip: bool = True,
    crop: bool = True,
) -> v2.Compose:
    """ALBEF pretraining augmentation for RGB PIL images -> normalized float tensor [3, S, S].

    `crop=False` resizes the whole image to S x S instead of a random resized crop (ALBEF's
    grounding training, whose expressions may name any part of the image).
    """
    if crop:
        first = v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)
    else:
        first = v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    steps = [first]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment:
        steps.append(albef_randaugment())
    return v2.Compose(steps + _to_normalized_tensor(mean, std))


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Deterministic square bicubic resize -> normalized float tensor [3, S, S]."""
    resize = v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    return v2.Compose([resize] + _to_normalized_tensor(mean, std))
