"""Write pre-resized WebDataset shards from ALBEF JSON annotation files (for data.format: wds).

Each annotation entry becomes one shard sample: ``KEY.jpg`` (the image with its shorter side
resized to --size, never enlarged, re-encoded at --quality) and ``KEY.json``
(``{"caption": [...], "image_id": N, "image": "path as in the annotation file"}``). Ids are the
ones the JSON path gives (`albef.data.datasets.load_annotations`), so both formats agree. Entries
are shuffled (--seed) before they are cut into shards, since the training stream shuffles shards,
not samples. Unreadable images are skipped and counted.

    python scripts/make_shards.py data/coco.json data/vg.json --image-root /data/images \\
        --out shards/pretrain --size 384 --shard-size 1000 --workers 16

It prints the two config values to use: data.shards (a brace pattern) and data.num_samples.
With ALBEF's 256 px crops at scale 0.2, a shorter side of 384 or more keeps crops from being
enlarged much; the default 384 is a compromise between shard size and pixels.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import sys
from collections import Counter
from functools import partial
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from albef.data.datasets import AnnotationError, SampleError, load_annotations, read_image  # noqa: E402
from albef.data.transforms import jpeg_draft_size  # noqa: E402


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """`image` with its shorter side `size` (bicubic, aspect kept); smaller images are kept as they are."""
    width, height = image.size
    if min(width, height) <= size:
        return image
    scale = size / min(width, height)
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(target, Image.BICUBIC)


def encode_entry(entry: dict, image_root: str, size: int, quality: int) -> tuple[bytes | None, str]:
    """(JPEG bytes of the resized image, '') or (None, failure reason). Large JPEGs decode at a
    reduced scale that still leaves the shorter side >= `size` (`PIL.Image.draft`)."""
    path = os.path.join(image_root, entry["image"])
    try:
        image = read_image(path, partial(jpeg_draft_size, image_size=size))
    except SampleError as exn:
        return None, exn.reason
    buffer = io.BytesIO()
    resize_shorter(image, size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), ""


def make_shards(
    files: Sequence[str],
    image_root: str,
    out: str,
    size: int = 384,
    quality: int = 95,
    shard_size: int = 1000,
    seed: int = 0,
    shuffle: bool = True,
    workers: int = 1,
    prefix: str = "shard",
) -> dict[str, Any]:
    """Write the shards under `out`; returns {shards: brace pattern, num_samples, skipped: {reason: n}}."""
    entries = load_annotations(files, expand=False)
    if shuffle:
        random.Random(seed).shuffle(entries)
    os.makedirs(out, exist_ok=True)
    pattern = os.path.join(out, f"{prefix}-%06d.tar")
    encode = partial(encode_entry, image_root=image_root, size=size, quality=quality)
    skipped: Counter = Counter()
    written = 0
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        images = pool.imap(encode, entries, chunksize=8) if pool else map(encode, entries)
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
            for number, (entry, (data, reason)) in enumerate(zip(entries, images)):
                if data is None:
                    skipped[reason] += 1
                    continue
                captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
                meta = {"caption": captions, "image_id": entry["id"], "image": entry["image"]}
                writer.write({"__key__": f"{number:09d}", "jpg": data, "json": json.dumps(meta).encode()})
                written += 1
            num_shards = writer.shard if written else 0
    finally:
        if pool:
            pool.close()
            pool.join()
    shards = os.path.join(out, f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar") if written else None
    return {"shards": shards, "num_samples": written, "skipped": dict(skipped)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="ALBEF annotation JSON files")
    parser.add_argument("--image-root", default="", help="directory the annotation image paths are relative to")
    parser.add_argument("--out", required=True, help="output directory for the .tar shards")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (PREFIX-000000.tar)")
    parser.add_argument("--size", type=int, default=384, help="shorter image side in pixels (never enlarged)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the annotation order")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode/resize processes")
    args = parser.parse_args(argv)
    for name, value, low, high in (("--size", args.size, 1, None), ("--quality", args.quality, 1, 100),
                                   ("--shard-size", args.shard_size, 1, None), ("--workers", args.workers, 1, None)):
        if value < low or (high is not None and value > high):
            print(f"make_shards: {name}={value} must be in [{low}, {high or 'inf'}]", file=sys.stderr)
            return 2
    try:
        result = make_shards(args.files, args.image_root, args.out, args.size, args.quality, args.shard_size,
                             args.seed, not args.no_shuffle, args.workers, args.prefix)
    except AnnotationError as exn:
        print(f"make_shards: {exn}", file=sys.stderr)
        return 2
    skipped = sum(result["skipped"].values())
    if not result["num_samples"]:
        print(f"make_shards: no readable image ({result['skipped']}); check --image-root", file=sys.stderr)
        return 2
    print(f"wrote {result['num_samples']} samples ({skipped} unreadable images skipped: {result['skipped']})")
    print(f"data.format=wds data.shards={result['shards']} data.num_samples={result['num_samples']}"
          "  (data.num_samples counts entries; with data.caption_list=expand count captions instead)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
