"""Caption datasets (ALBEF JSON files or WebDataset shards), bad-sample accounting, loaders.

Samples are dicts ``{image: FloatTensor[3,H,W], caption: str, id: int, index: int}``. A sample
that cannot be used is returned as a `BadSample(reason, index, detail)` marker instead of raising;
the `Collator` (collate.py) drops markers and reports them per batch as ``batch["skipped"] =
{reason: count}``. Reasons: ``missing`` (no such file), ``unreadable``, ``empty_file``,
``truncated``, ``decode`` (not an image), ``empty_caption``, ``encoding`` (caption bytes not
UTF-8), ``metadata`` (bad json in a shard), ``incomplete`` (shard sample without image or
caption), ``truncated_shard`` (a shard cut short: the rest of that shard is skipped, counted once).

Counts are produced in the data workers, so they travel with the batch; the engine folds them
into a `SkipCounter` (``counter.update(batch)``), merges ranks with ``counter.all_reduce()``, logs
``counter.report()`` and stops with ``counter.check(max_bad_fraction)`` (or the functional
`check_bad_fraction`).

Augmentation is deterministic per sample: the transform runs under a forked torch RNG seeded from
(seed, epoch, index), so a resumed run sees the same pixels and the caller's global RNG is left
untouched, in the main process as in workers. The epoch lives in shared memory (`SharedEpoch`) so
persistent workers see `set_epoch`.

Engine-facing API::

    dataset = CaptionDataset(files, image_root, transform, max_words, seed)       # data.format=json
    dataset = webdataset_pipeline(shards, transform, max_words, seed, num_samples) # data.format=wds
    loader = build_train_loader(dataset, Collator(tokenizer, max_tokens), batch_size=...,
                                num_workers=..., rank=..., world_size=..., seed=...)
    set_epoch(loader, epoch, consumed)  # before iter(loader); consumed = global samples done
    loader = build_eval_loader(dataset, collator, batch_size=..., num_workers=...)
"""
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset

from albef.config import Config, config_error
from albef.dist import gather_objects, is_distributed

from .captions import pre_caption
from .device_decode import EncodedImage, encode_for_device
from .sampler import ResumableDistributedSampler

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class AnnotationError(ValueError):
    """An annotation file is unreadable or not in ALBEF's format."""


class BadDataError(RuntimeError):
    """Too large a fraction of the data was skipped."""


@dataclass(frozen=True)
class BadSample:
    """Marker returned in place of a sample that cannot be used."""

    reason: str
    index: int
    detail: str = ""


class SampleError(Exception):
    """Raised while reading one sample; turned into a `BadSample` by the dataset."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- images

def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; 16/32-bit grey is rescaled to 8 bits rather than clipped."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = pixels.max(initial=0.0)
        if image.mode in _SIXTEEN_BIT_MODES or 255 < peak <= 65535:
            pixels = pixels / 257.0
        elif peak > 65535:
            pixels = pixels * (255.0 / peak)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


DraftSize = Callable[[tuple[int, int]], "tuple[int, int] | None"]


def _decode(fp: Any, name: str, draft_size: DraftSize | None = None) -> Image.Image:
    try:
        with Image.open(fp) as image:
            if draft_size is not None and image.format == "JPEG":
                reduced = draft_size(image.size)
                if reduced is not None:  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
                    image.draft(None, reduced)
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError as exn:
        raise SampleError("decode", f"{name}: not a readable image") from exn
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        reason = "truncated" if isinstance(exn, EOFError) or "truncat" in str(exn).lower() else "decode"
        raise SampleError(reason, f"{name}: {exn}") from exn


def read_file(path: str) -> bytes:
    """The bytes of an image file, or `SampleError` (missing / unreadable / empty)."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # never open a FIFO, device or socket: it may block
            raise SampleError("unreadable", f"{path}: not a regular file (a FIFO, device or socket)")
        with open(path, "rb") as fp:
            data = fp.read()
    except FileNotFoundError as exn:
        raise SampleError("missing", f"{path}: no such file") from exn
    except OSError as exn:  # a directory, no permission, an I/O error: this sample's problem
        raise SampleError("unreadable", f"{path}: {exn.strerror or exn}") from exn
    if not data:
        raise SampleError("empty_file", f"{path}: zero bytes")
    return data


def read_image(path: str, draft_size: DraftSize | None = None) -> Image.Image:
    """Load an image file as RGB or raise `SampleError` (missing/unreadable/empty/truncated/decode).

    `draft_size(size) -> (w, h) | None` lets a JPEG decode at a reduced scale (`PIL.Image.draft`;
    the transforms' ``draft_size``, set by data.jpeg_draft); None decodes at full size."""
    return decode_image(read_file(path), path, draft_size)


def decode_image(data: bytes, name: str, draft_size: DraftSize | None = None) -> Image.Image:
    """Decode encoded image bytes as RGB or raise `SampleError` (`draft_size`: see `read_image`)."""
    if not data:
        raise SampleError("empty_file", f"{name}: zero bytes")
    return _decode(io.BytesIO(data), name, draft_size)


def decode_for(transform: Callable, data: bytes, name: str) -> Image.Image | EncodedImage:
    """What `make_sample` hands to `transform`: the image decoded here with PIL, or with
    ``transform.decode == 'device'`` (data.decode) the `EncodedImage` the device decodes."""
    if getattr(transform, "decode", "workers") == "device":
        return encode_for_device(data, name, decode_image)
    return decode_image(data, name, getattr(transform, "draft_size", None))


# ----------------------------------------------------------------------------- samples

class SharedEpoch:
    """An epoch number in shared memory, visible to (persistent) DataLoader workers."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch; `stream` > 0 gives independent
    seeds for other draws of the same sample (1: its MLM mask)."""
    entropy = [seed, epoch, index] + ([stream] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


MLM_STREAM = 1  # sample_seed stream of the MLM masks (albef.data.masking.MLMMasking, in the collate)


def make_sample(
    image: Image.Image | EncodedImage | SampleError,
    raw_caption: str,
    sample_id: int,
    index: int,
    transform: Callable,
    max_words: int,
    seed: int,
    epoch: int,
    name: str,
) -> dict | BadSample:
    """Clean the caption and transform the image under a per-sample seed (global RNG untouched).

    An empty caption is reported first, then an image error, so both formats agree on the reason.
    """
    caption = pre_caption(raw_caption, max_words)
    if not caption.strip():
        return BadSample("empty_caption", index, f"{name}: caption {raw_caption!r} is empty after cleaning")
    if isinstance(image, SampleError):
        return BadSample(image.reason, index, image.detail)
    sample = {"caption": caption, "id": sample_id, "index": index,
              "mlm_seed": sample_seed(seed, epoch, index, MLM_STREAM)}
    if isinstance(image, EncodedImage):  # data.decode=device: transformed after decoding on the device
        return {"image": replace(image, seed=sample_seed(seed, epoch, index), transform=transform), **sample}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(seed, epoch, index))
        pixels = transform(image)
    return {"image": pixels, **sample}


# ----------------------------------------------------------------------------- JSON format

def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fp:
            return json.load(fp)
    except FileNotFoundError as exn:
        raise AnnotationError(f"{path}: annotation file not found (check data.train_files / eval.val_files / eval.test_files)") from exn
    except UnicodeDecodeError as exn:
        raise AnnotationError(f"{path}: not UTF-8 text at byte {exn.start}; re-encode the file as UTF-8") from exn
    except json.JSONDecodeError as exn:
        raise AnnotationError(
            f"{path}: invalid JSON at line {exn.lineno}, column {exn.colno}: {exn.msg}"
        ) from exn


def _check_entry(entry: Any, path: str, i: int) -> list[str]:
    """Validate one ALBEF entry and return its captions."""
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object with 'image' and 'caption', got {type(entry).__name__}")
    if not isinstance(entry.get("image"), str) or not entry["image"]:
        raise AnnotationError(f"{where}: 'image' must be a non-empty path string")
    captions = entry.get("caption")
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise AnnotationError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    image_id = entry.get("image_id")
    if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, (int, str))):
        raise AnnotationError(f"{where}: 'image_id' must be an integer or a string")
    return captions


def _read_entries(path: str) -> list[tuple[dict, list[str]]]:
    """(entry, its captions) for every entry of one annotation file, validated."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return [(entry, _check_entry(entry, path, i)) for i, entry in enumerate(data)]


def check_annotation_file(path: str) -> None:
    """Raise `AnnotationError` (one line naming the file and entry) unless `path` is a valid
    ALBEF annotation file; reads no image."""
    _read_entries(path)


def load_annotations(files: str | Sequence[str], expand: bool = True) -> list[dict]:
    """Read ALBEF annotation files into one flat list of ``{image, caption, id}`` samples.

    Each entry is ``{"image": path, "caption": str | [str, ...], "image_id"?: int | str}``; a
    caption list gives one sample per caption, all sharing the image's id (with `expand=False`
    one sample per entry, whose ``caption`` stays the list). Ids are consecutive integers from
    0, in order of first appearance: one per (file, image_id), or per image path for entries
    without an image_id. So ids of different files never collide, and no id is negative
    (negative ids mark the feature queue's empty or unknown slots).
    """
    files = [files] if isinstance(files, str) else list(files)
    ids: dict[tuple, int] = {}
    samples = []
    for path in files:
        for entry, captions in _read_entries(path):
            image_id = entry.get("image_id")
            key = ("path", entry["image"]) if image_id is None else ("id", path, image_id)
            sample_id = ids.setdefault(key, len(ids))
            if expand or isinstance(entry["caption"], str):
                samples += [{"image": entry["image"], "caption": caption, "id": sample_id} for caption in captions]
            else:
                samples.append({"image": entry["image"], "caption": captions, "id": sample_id})
    return samples


CAPTION_LIST_MODES = ("random", "expand")


def pick_caption(captions: Sequence[str], seed: int, epoch: int, index: int) -> tuple[int, str]:
    """(number, caption): ALBEF's random choice of one caption per access, drawn from
    (seed, epoch, index) so that a resumed run draws the same."""
    number = random.Random(sample_seed(seed, epoch, index)).randrange(len(captions))
    return number, captions[number]


class EpochDataset(Dataset):
    """Annotated samples whose augmentation is seeded by (seed, epoch, index). The epoch lives in
    shared memory, so that persistent DataLoader workers see `set_epoch` (a plain attribute
    would stay at the value the workers were started with)."""

    def __init__(self, samples: list, transform: Callable, seed: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.samples)


class CaptionDataset(EpochDataset):
    """ALBEF JSON annotations over image files (data.format=json).

    `caption_list` (data.caption_list) says what an entry with a list of captions becomes:
    'random', one sample whose caption is drawn per access (per epoch) as ALBEF's pretraining
    dataset does, or 'expand', one sample per caption.
    """

    def __init__(
        self,
        files: str | Sequence[str],
        image_root: str,
        transform: Callable,
        max_words: int = 30,
        seed: int = 0,
        caption_list: str = "random",
    ) -> None:
        if caption_list not in CAPTION_LIST_MODES:
            raise ValueError(f"caption_list must be one of {CAPTION_LIST_MODES} (got {caption_list!r})")
        super().__init__(load_annotations(files, expand=caption_list == "expand"), transform, seed)
        self.image_root = image_root
        self.max_words = max_words

    def __getitem__(self, index: int) -> dict | BadSample:
        ann = self.samples[index]
        path = os.path.join(self.image_root, ann["image"])
        try:
            image = decode_for(self.transform, read_file(path), path)
        except SampleError as exn:
            image = exn
        epoch, caption = self.epoch.get(), ann["caption"]
        if not isinstance(caption, str):
            caption = pick_caption(caption, self.seed, epoch, index)[1]
        return make_sample(
            image, caption, ann["id"], index, self.transform,
            self.max_words, self.seed, epoch, path,
        )


# ----------------------------------------------------------------------------- WebDataset format

def stable_index(key: str, caption_number: int) -> int:
    """The `index` of a shard sample: a 31-bit hash of its key and caption number."""
    return zlib.crc32(f"{key}/{caption_number}".encode()) & 0x7FFFFFFF


def _shard_meta(sample: Mapping[str, Any]) -> dict:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except UnicodeDecodeError as exn:
        raise SampleError("encoding", f"{sample['__key__']}.json is not UTF-8") from exn
    except ValueError as exn:
        raise SampleError("metadata", f"{sample['__key__']}.json: {exn}") from exn
    if not isinstance(meta, dict):
        raise SampleError("metadata", f"{sample['__key__']}.json is not an object")
    return meta


def _shard_captions(sample: Mapping[str, Any], meta: dict) -> list[str]:
    key = sample["__key__"]
    if "txt" in sample:
        try:
            return [sample["txt"].decode("utf-8")]
        except UnicodeDecodeError as exn:
            raise SampleError("encoding", f"{key}.txt is not UTF-8 ({exn.reason} at byte {exn.start})") from exn
    captions = meta.get("caption")
    captions = [captions] if isinstance(captions, str) else captions
    if not captions:
        raise SampleError("incomplete", f"{key}: no .txt and no 'caption' in .json")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise SampleError("metadata", f"{key}.json: 'caption' must be a string or a list of strings")
    return captions


def _shard_id(sample: Mapping[str, Any], meta: dict) -> int:
    """``image_id``/``id`` from the json, else ``cls``, else the key; strings are hashed."""
    value = meta.get("image_id", meta.get("id"))
    if value is None and "cls" in sample:
        value = sample["cls"].decode("utf-8", "replace").strip()
        value = int(value) if value.lstrip("-").isdigit() else value
    if value is None:
        value = sample["__key__"]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return zlib.crc32(str(value).encode()) & 0x7FFFFFFF


def _read_shards(urls: Iterable[dict]) -> Iterator[dict | BadSample]:
    """Samples of each shard; a shard that fails part-way ends with one ``truncated_shard``."""
    for item in urls:
        try:
            yield from wds.tarfile_samples([dict(item)])
        except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
            yield BadSample("truncated_shard", -1, f"{item['url']}: {exn}")


class ShardStream(IterableDataset):
    """Caption samples from WebDataset shards (data.format=wds); see `webdataset_pipeline`."""

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable,
        max_words: int = 30,
        seed: int = 0,
        num_samples: int | None = None,
        caption_list: str = "random",
    ) -> None:
        if caption_list not in CAPTION_LIST_MODES:
            raise ValueError(f"caption_list must be one of {CAPTION_LIST_MODES} (got {caption_list!r})")
        self.caption_list = caption_list
        self.urls = list(urls)
        self.transform = transform
        self.max_words = max_words
        self.seed = seed
        self.num_samples = num_samples
        self.epoch = SharedEpoch()
        self._skip_batches = multiprocessing.Value("q", 0)
        self._batch_size = multiprocessing.Value("q", 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)
        self.set_start(0, 1)

    def set_start(self, batches: int, batch_size: int) -> None:
        """Resume after this rank drew `batches` batches (same world size and worker count)."""
        self._skip_batches.value = batches
        self._batch_size.value = batch_size

    def _shard_order(self, epoch: int) -> Iterator[dict]:
        """The epoch's shard order, shared by all ranks; endless when `num_samples` is set."""
        for repeat in itertools.count() if self.num_samples else range(1):
            order = list(self.urls)
            random.Random(sample_seed(self.seed, epoch, repeat)).shuffle(order)
            yield from (dict(url=url) for url in order)

    def _expand(self, sample: dict, epoch: int) -> Iterator[dict | BadSample]:
        key = sample["__key__"]
        try:
            meta = _shard_meta(sample)
            captions = _shard_captions(sample, meta)
            sample_id = _shard_id(sample, meta)
        except SampleError as exn:
            yield BadSample(exn.reason, stable_index(key, 0), exn.detail)
            return
        try:
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                raise SampleError("incomplete", f"{key}: no image ({'/'.join(IMAGE_KEYS)})")
            image = decode_for(self.transform, data, key)
        except SampleError as exn:
            image = exn
        numbered = enumerate(captions)
        if self.caption_list == "random" and len(captions) > 1:
            numbered = [pick_caption(captions, self.seed, epoch, stable_index(key, 0))]
        for number, caption in numbered:
            yield make_sample(
                image, caption, sample_id, stable_index(key, number), self.transform,
                self.max_words, self.seed, epoch, key,
            )

    def __iter__(self) -> Iterator[dict | BadSample]:
        epoch = self.epoch.get()
        _, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        urls = wds.split_by_worker(wds.split_by_node(self._shard_order(epoch)))
        stream = (
            out
            for sample in _read_shards(urls)
            for out in ([sample] if isinstance(sample, BadSample) else self._expand(sample, epoch))
        )
        batches = self._skip_batches.value
        skip = (batches // num_workers + (worker < batches % num_workers)) * self._batch_size.value
        stop = None
        if self.num_samples:
            stop = math.ceil(self.num_samples / (world_size * num_workers))
        yield from itertools.islice(stream, skip, stop)


def webdataset_pipeline(
    shards: str | Sequence[str],
    transform: Callable,
    max_words: int = 30,
    seed: int = 0,
    num_samples: int | None = None,
    caption_list: str = "random",
) -> ShardStream:
    """A `ShardStream` over a brace pattern or list of shard urls.

    Shards are permuted per epoch from (seed, epoch) identically on every rank, then split across
    ranks (`wds.split_by_node`) and workers (`wds.split_by_worker`). With `num_samples` the shard
    list repeats and each worker yields ``num_samples / (world_size * num_workers)`` samples, so
    all ranks run the same number of steps; without it each worker makes one pass over its shards.
    """
    return ShardStream(shard_urls(shards), transform, max_words, seed, num_samples, caption_list)


def shard_urls(shards: str | Sequence[str]) -> list[str]:
    """The shard urls of a brace pattern (`data/cc3m-{000000..000331}.tar`) or list; raises
    FileNotFoundError naming the first local shard that does not exist (remote urls and `pipe:`
    commands are not checked)."""
    urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else list(shards)
    if not urls:
        raise FileNotFoundError(f"'{shards}' matches no shards")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"shard file not found: '{missing[0]}' ({len(missing)} of {len(urls)} "
                                f"shards missing, relative to {os.getcwd()})")
    return urls


# ----------------------------------------------------------------------------- accounting

PREFLIGHT_BUDGET_S = 60.0  # seconds the image preflight of one split may take
PREFLIGHT_SAMPLE = 2000  # images checked per split at most (a fixed-seed sample of larger sets)


def preflight_images(paths: Sequence[str], source: str, max_fraction: float,
                     budget_s: float = PREFLIGHT_BUDGET_S, sample: int = PREFLIGHT_SAMPLE) -> tuple[int, Counter]:
    """Before training: read the distinct images `paths` as the loaders do (`read_image`: exists,
    regular file, decodes; special files are counted unreadable, never opened). Sets larger than
    `sample` are checked on a fixed-seed sample; checking stops after `budget_s` seconds. Raise
    AnnotationError, one line naming `source`, the first bad image and the counts, when more than
    `max_fraction` of those checked are unusable (`data.max_bad_fraction`'s rule); returns
    (checked, counts per reason)."""
    import time

    distinct = sorted(set(paths))
    if len(distinct) > sample:
        distinct = sorted(random.Random(0).sample(distinct, sample))
    counts: Counter = Counter()
    first_bad, checked, start = "", 0, time.monotonic()
    for path in distinct:
        if checked and time.monotonic() - start > budget_s:
            break
        checked += 1
        try:
            read_image(path)
        except SampleError as err:
            counts[err.reason] += 1
            first_bad = first_bad or err.detail
    bad = sum(counts.values())
    if checked and bad / checked > max_fraction:
        detail = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
        raise AnnotationError(f"{source}: {bad} of {checked} images checked are unusable ({detail}; first: {first_bad}), "
                              f"above the allowed fraction {max_fraction:g}; fix the files or the image root")
    return checked, counts


def preflight_files(files: Sequence[str], load: Callable[[list[str]], list], images: Callable[[Any], Iterable[str]],
                    image_root: str, what: str, max_fraction: float) -> list:
    """Preflight of one split: each annotation file of `files` parses (`load([file])`) and is not
    empty (one line naming it), then the images of its entries (`images(entry)`, relative to
    `image_root`) pass `preflight_images` under `max_fraction`. Returns the entries."""
    entries = []
    for file in files:
        loaded = load([file])
        if not loaded:
            raise AnnotationError(f"{file}: no entries; {what} must list at least one")
        entries += loaded
    if entries:
        paths = [os.path.join(image_root, image) for entry in entries for image in images(entry)]
        preflight_images(paths, f"{what} ({', '.join(files)})", max_fraction)
    return entries


def check_bad_fraction(counts: Mapping[str, int], seen: int, max_fraction: float) -> None:
    """Raise `BadDataError` when more than `max_fraction` of the `seen` samples were skipped."""
    skipped = sum(counts.values())
    if seen and skipped / seen > max_fraction:
        detail = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()) if n)
        raise BadDataError(
            f"{skipped} of {seen} samples ({skipped / seen:.2%}) were unusable ({detail}), above "
            f"data.max_bad_fraction={max_fraction}; fix or remove the bad files, or raise the bound"
        )


@dataclass
class SkipCounter:
    """Skipped-sample counts per reason over `seen` samples (good + skipped)."""

    counts: Counter = field(default_factory=Counter)
    seen: int = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one collated batch (its ``index`` and ``skipped`` entries)."""
        skipped = batch["skipped"]
        self.counts.update(skipped)
        self.seen += len(batch["index"]) + sum(skipped.values())

    def all_reduce(self) -> "SkipCounter":
        """The totals over all ranks (a copy of this counter when not distributed)."""
        if not is_distributed():
            return SkipCounter(Counter(self.counts), self.seen)
        total = SkipCounter()
        for counts, seen in gather_objects((dict(self.counts), self.seen)):
            total.counts.update(counts)
            total.seen += seen
        return total

    def check(self, max_fraction: float) -> None:
        check_bad_fraction(self.counts, self.seen, max_fraction)

    def report(self) -> str:
        """One line for the logs, e.g. ``skipped 3/1000 samples (0.30%): missing=2 truncated=1``."""
        skipped = sum(self.counts.values())
        share = skipped / self.seen if self.seen else 0.0
        detail = " ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()) if n)
        return f"skipped {skipped}/{self.seen} samples ({share:.2%})" + (f": {detail}" if detail else "")

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = Counter(state["counts"])
        self.seen = int(state["seen"])


# ----------------------------------------------------------------------------- loaders

def build_train_loader(
    dataset: CaptionDataset | ShardStream,
    collator: Callable,
    *,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> DataLoader:
    """Training DataLoader: resumable shuffled sampler (json) or sharded stream (wds), full batches."""
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = ResumableDistributedSampler(len(dataset), world_size, rank, shuffle=True, seed=seed)
    return _loader(dataset, collator, sampler, batch_size, num_workers, seed, drop_last=True)


def build_eval_loader(
    dataset: CaptionDataset,
    collator: Callable,
    *,
    batch_size: int,
    num_workers: int,
) -> DataLoader:
    """Evaluation DataLoader over the whole dataset in order, on every rank (as ALBEF)."""
    return _loader(dataset, collator, None, batch_size, num_workers, 0, drop_last=False)


def _restore_default(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)


def _absorb_group_signals(worker_id: int) -> None:
    """Worker init: a SIGTERM/SIGUSR1 sent to the whole process group (a scheduler's preemption
    notice) is for the main process, which saves a checkpoint and then stops the workers; a
    second SIGTERM (`Process.terminate()`) still ends the worker."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _restore_default)


def _loader(dataset, collator, sampler, batch_size, num_workers, seed, drop_last) -> DataLoader:
    if num_workers > 0:  # the tokenizer runs in the workers; its own thread pool would fight them
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_absorb_group_signals,
    )


def set_epoch(loader: DataLoader, epoch: int, consumed: int = 0) -> None:
    """Select `epoch` (augmentation seeds, shuffle) and skip `consumed` global samples of it.

    Call before ``iter(loader)``. For json data `consumed` may come from a run on another world
    size. For wds it is converted to this rank's batches and assumes the same world size and
    number of workers as the run that consumed them.
    """
    dataset = loader.dataset
    dataset.set_epoch(epoch)
    if isinstance(loader.sampler, ResumableDistributedSampler):
        loader.sampler.set_epoch(epoch)
        loader.sampler.set_start(consumed)
    elif isinstance(dataset, ShardStream) and consumed:
        world_size = wds.utils.pytorch_worker_info()[1]
        dataset.set_start(consumed // (loader.batch_size * world_size), loader.batch_size)



def check_data_files(cfg: Config, training: bool = True) -> None:
    """Read the caption annotation files (train, when `training`, and eval) and find the shard
    files the config names, without loading any image, so that a malformed file is a
    ConfigError before anything is built. For tasks whose data are image-caption pairs."""
    files = [(f"data.train_files[{i}]", f) for i, f in enumerate(cfg.data.train_files)] \
        if cfg.data.format == "json" and training else []
    for split in ("val_files", "test_files"):
        files += [(f"eval.{split}[{i}]", f) for i, f in enumerate(getattr(cfg.eval, split))]
    for key, file in files:
        try:
            check_annotation_file(file)
        except AnnotationError as err:
            raise config_error(cfg, key, str(err)) from None
    if cfg.data.format == "wds" and training:
        try:
            shard_urls(cfg.data.shards)
        except FileNotFoundError as err:
            raise config_error(cfg, "data.shards", str(err)) from None
