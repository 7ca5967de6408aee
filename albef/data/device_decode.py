"""data.decode: device -- JPEG decoding and augmentation on the training device.

With the default ``data.decode: workers`` the DataLoader workers decode each image with PIL and
run the augmentation (`albef.data.transforms.train_transform`) on the CPU. When the CPUs cannot
keep up with the GPU, ``data.decode: device`` moves that work to the training device:

1. a worker only reads the file (or shard entry) and checks the JPEG header with PIL, which
   decodes nothing (`encode_for_device`). A file the device decoder cannot take (not a JPEG, CMYK,
   no end-of-image marker, i.e. truncated) is decoded by the worker as before and travels as
   uint8 pixels; a file PIL cannot open at all is a counted skip, as on the worker path;
2. the collate keeps the batch as `EncodedImages`;
3. moving the batch to the device (`EncodedImages.to`, called by the engine's ``to_device``)
   decodes every JPEG of the batch in one `torchvision.io.decode_jpeg` call on that device
   (nvJPEG on CUDA; libjpeg-turbo on a CPU run, which is what the tests exercise) and runs the
   same torchvision v2 pipeline on the uint8 tensors, each image under its sample's seed.

So the two paths make the same random draws (crop box, flip, RandAugment ops and magnitudes) for
every sample and a resumed run sees the same augmentation; the pixels differ only as tensor and
PIL resampling kernels (and JPEG decoders) differ. No `PIL.Image.draft` reduction on this path:
the device decodes at full size.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

DECODE_MODES = ("workers", "device")
_DEVICE_MODES = ("RGB", "L")  # JPEG colour spaces decode_jpeg turns into RGB on every device
_END_OF_IMAGE = b"\xff\xd9"


@dataclass
class EncodedImage:
    """One training image on its way to the device: `data` is uint8 [N] JPEG bytes, or uint8
    [3, H, W] pixels the worker decoded; `transform` runs on the device under `seed`."""

    data: torch.Tensor
    name: str
    seed: int = 0
    transform: Callable | None = None

    @property
    def is_jpeg(self) -> bool:
        return self.data.dim() == 1


def device_decodable(data: bytes) -> bool:
    """True when `data` is a complete baseline/progressive RGB or greyscale JPEG by its header and
    end marker (what nvJPEG decodes); PIL reads only the header here."""
    if not data.rstrip(b"\0").endswith(_END_OF_IMAGE):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format == "JPEG" and image.mode in _DEVICE_MODES
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def encode_for_device(data: bytes, name: str, decode: Callable[[bytes, str], Image.Image]) -> EncodedImage:
    """The worker's part: the JPEG bytes as they are, or, for anything else, the pixels `decode`
    gives (which raises `SampleError` for an unreadable image, as on the worker path)."""
    if device_decodable(data):
        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), name)
    pixels = np.asarray(decode(data, name), dtype=np.uint8)
    return EncodedImage(torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), name)


class EncodedImages:
    """A batch of `EncodedImage`; ``.to(device)`` gives the float [B, 3, S, S] batch on `device`."""

    def __init__(self, items: Sequence[EncodedImage]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "EncodedImages":  # DataLoader(pin_memory=True) calls this
        return EncodedImages([EncodedImage(item.data.pin_memory(), item.name, item.seed, item.transform)
                              for item in self.items])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        pixels = self.decode(device, non_blocking)
        out = []
        for item, image in zip(self.items, pixels):
            with torch.random.fork_rng(devices=[]):  # the draws are on the CPU generator, as in the workers
                torch.manual_seed(item.seed)
                out.append(item.transform(image))
        return torch.stack(out)

    def decode(self, device: torch.device, non_blocking: bool = False) -> list[torch.Tensor]:
        """uint8 [3, H, W] pixels of every image on `device`: all JPEGs in one decode_jpeg call."""
        pixels: list[torch.Tensor | None] = [None] * len(self.items)
        jpegs = [i for i, item in enumerate(self.items) if item.is_jpeg]
        if jpegs:
            try:
                decoded = decode_jpeg([self.items[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad stream fails the batch: find it
                decoded = [self._decode_one(self.items[i], device) for i in jpegs]
            for i, image in zip(jpegs, decoded):
                pixels[i] = image
        for i, item in enumerate(self.items):
            if not item.is_jpeg:
                pixels[i] = item.data.to(device, non_blocking=non_blocking)
        return pixels

    @staticmethod
    def _decode_one(item: EncodedImage, device: torch.device) -> torch.Tensor:
        try:
            return decode_jpeg(item.data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exn:
            raise DeviceDecodeError(
                f"{item.name}: the JPEG decoder on {device} failed ({_reason(exn)}); remove or "
                f"re-encode this file, or train with data.decode=workers (which skips unreadable images)") from exn


def _reason(exn: RuntimeError) -> str:
    """libjpeg's message without torchvision's source location ('decode_jpeg, FILE:LINE, MESSAGE')."""
    return str(exn).splitlines()[0].rsplit(", ", 1)[-1] if str(exn) else type(exn).__name__


class DeviceDecodeError(RuntimeError):
    """A JPEG whose header and end marker looked whole failed to decode on the device."""


def stack_images(images: Sequence[torch.Tensor | EncodedImage]) -> torch.Tensor | EncodedImages:
    """The collate's image batch: stacked tensors, or `EncodedImages` on the device-decode path."""
    if images and isinstance(images[0], EncodedImage):
        return EncodedImages(images)
    return torch.stack(list(images))
