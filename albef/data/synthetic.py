"""Demo corpus: procedural scenes with captions that say exactly what is drawn.

Each image shows one or two shapes (6 shapes, 8 colours, 2 sizes, 5 positions or a left/right or
above/below pair) on one of 3 backgrounds; captions come from varied templates, so image-text
retrieval is learnable by a small model in minutes. `generate_corpus` writes::

    out_dir/images/{train,test}_NNNNNN.jpg
    out_dir/train.json  out_dir/test.json    ALBEF format; test entries carry image_id
    out_dir/shards/train-NNNNNN.tar           the train split as WebDataset shards
                                              (key.jpg + key.json {image_id, caption: [...]})
    out_dir/bert/                             WordPiece vocab.txt covering every caption,
                                              tokenizer files and a BertConfig (config.json)

Both train formats give the same samples: train image i has id i either way. Deterministic for a
seed. CLI: ``python -m albef.data.synthetic --out demo_data``.
"""
import argparse
import io
import json
import math
import os
import random
import re
import string
from dataclasses import dataclass

import webdataset as wds
from PIL import Image, ImageDraw
from transformers import BertConfig, BertTokenizer

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 180), "orange": (250, 140, 20), "pink": (250, 130, 190), "brown": (130, 80, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SIZES = {"small": 0.12, "large": 0.2}  # radius as a fraction of the image side
POSITIONS = {
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
WHERE = {
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "center": "in the center",
}
SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "there is a {size} {color} {shape} {where} of the picture",
    "{where}, a {size} {color} {shape} on a {background} background",
    "a {background} background with a {color} {shape} {where}",
    "a {size} {shape} colored {color}, {where}",
    "one {color} {shape}, {size}, {where}",
)
PAIR_TEMPLATES = {
    "horizontal": (
        "a {size1} {color1} {shape1} to the left of a {size2} {color2} {shape2}",
        "a {size2} {color2} {shape2} to the right of a {size1} {color1} {shape1}",
        "two shapes: a {color1} {shape1} on the left and a {color2} {shape2} on the right",
        "a {color1} {shape1} next to a {color2} {shape2} on a {background} background",
    ),
    "vertical": (
        "a {size1} {color1} {shape1} above a {size2} {color2} {shape2}",
        "a {size2} {color2} {shape2} below a {size1} {color1} {shape1}",
        "two shapes: a {color1} {shape1} at the top and a {color2} {shape2} at the bottom",
        "a {color1} {shape1} over a {color2} {shape2} on a {background} background",
    ),
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # fractions of the image side


def _polygon(cx: float, cy: float, r: float, corners: int, inner: float | None = None) -> list[tuple[float, float]]:
    """Regular polygon (or star when `inner` is a radius ratio) with a corner pointing up."""
    radii = [r] if inner is None else [r, r * inner]
    count = corners * len(radii)
    return [
        (cx + radii[k % len(radii)] * math.sin(2 * math.pi * k / count),
         cy - radii[k % len(radii)] * math.cos(2 * math.pi * k / count))
        for k in range(count)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, item: Shape, side: int) -> None:
    cx, cy = item.center[0] * side, item.center[1] * side
    r = SIZES[item.size] * side
    fill = COLORS[item.color]
    if item.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif item.shape == "square":
        half = 0.8 * r
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        corners, inner = {"triangle": (3, None), "diamond": (4, None), "hexagon": (6, None), "star": (5, 0.45)}[item.shape]
        draw.polygon(_polygon(cx, cy, r, corners, inner), fill=fill)


def _random_shape(rng: random.Random, position: str) -> Shape:
    x, y = POSITIONS[position]
    jitter = (rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02))
    return Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), (x + jitter[0], y + jitter[1]))


def _articles(caption: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)


def random_scene(rng: random.Random, num_captions: int) -> tuple[str, list[Shape], list[str]]:
    """A background, one or two shapes, and `num_captions` distinct captions describing them."""
    background = rng.choice(list(BACKGROUNDS))
    if rng.random() < 0.5:
        position = rng.choice(list(POSITIONS))
        item = _random_shape(rng, position)
        fields = dict(size=item.size, color=item.color, shape=item.shape, where=WHERE[position], background=background)
        templates, shapes = SINGLE_TEMPLATES, [item]
    else:
        layout = rng.choice(list(PAIR_TEMPLATES))
        first, second = ("left", "right") if layout == "horizontal" else ("top", "bottom")
        a = _random_shape(rng, first)
        b = _random_shape(rng, second)
        while (b.shape, b.color) == (a.shape, a.color):
            b = _random_shape(rng, second)
        fields = dict(size1=a.size, color1=a.color, shape1=a.shape, size2=b.size, color2=b.color,
                      shape2=b.shape, background=background)
        templates, shapes = PAIR_TEMPLATES[layout], [a, b]
    captions = [_articles(t.format(**fields)) for t in rng.sample(templates, num_captions)]
    return background, shapes, captions


def render(background: str, shapes: list[Shape], side: int) -> Image.Image:
    image = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for item in shapes:
        draw_shape(draw, item, side)
    return image


def vocabulary() -> list[str]:
    """WordPiece vocab: specials, every word of the grammar, then characters and ##characters."""
    text = " ".join(SINGLE_TEMPLATES + sum(PAIR_TEMPLATES.values(), ()))
    words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text)))
    words |= set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(SIZES) | set(POSITIONS)
    words |= {w for phrase in WHERE.values() for w in phrase.split()} | {"an"}
    chars = string.ascii_lowercase + string.digits
    tokens = [*SPECIAL_TOKENS, *sorted(words), *chars, *string.punctuation, *(f"##{c}" for c in chars)]
    return list(dict.fromkeys(tokens))  # single-letter words ("a") are also characters


def write_bert_dir(out_dir: str) -> None:
    """vocab.txt + tokenizer files + a BertConfig sized to the vocab (dims come from the YAML)."""
    os.makedirs(out_dir, exist_ok=True)
    vocab = vocabulary()
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as fp:
        fp.write("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    BertConfig(vocab_size=len(vocab)).save_pretrained(out_dir)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_split(
    out_dir: str, split: str, count: int, side: int, rng: random.Random, num_captions: int, shard_size: int | None
) -> None:
    entries = []
    shard_dir = os.path.join(out_dir, "shards")
    writer = None
    if shard_size:
        os.makedirs(shard_dir, exist_ok=True)
        writer = wds.ShardWriter(os.path.join(shard_dir, f"{split}-%06d.tar"), maxcount=shard_size, verbose=0)
    for i in range(count):
        background, shapes, captions = random_scene(rng, num_captions)
        data = _jpeg(render(background, shapes, side))
        path = f"images/{split}_{i:06d}.jpg"
        with open(os.path.join(out_dir, path), "wb") as fp:
            fp.write(data)
        entry = {"image": path, "caption": captions}
        entries.append(entry if split == "train" else {**entry, "image_id": i})
        if writer is not None:
            meta = {"image": path, "image_id": i, "caption": captions}
            writer.write({"__key__": f"{split}_{i:06d}", "jpg": data, "json": json.dumps(meta).encode()})
    if writer is not None:
        writer.close()
    with open(os.path.join(out_dir, f"{split}.json"), "w", encoding="utf-8") as fp:
        json.dump(entries, fp, indent=0)


def generate_corpus(
    out_dir: str,
    num_train: int = 2000,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 2,
    shard_size: int = 500,
    num_val: int = 200,
) -> dict[str, str]:
    """Write the demo corpus under `out_dir`; returns the paths to put in the config."""
    most = min(len(SINGLE_TEMPLATES), *(len(t) for t in PAIR_TEMPLATES.values()))
    if not 1 <= captions_per_image <= most:
        raise ValueError(f"captions_per_image={captions_per_image} must be in [1, {most}]")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    _write_split(out_dir, "train", num_train, image_size, rng, captions_per_image, shard_size)
    _write_split(out_dir, "test", num_test, image_size, rng, captions_per_image, None)
    _write_split(out_dir, "val", num_val, image_size, rng, captions_per_image, None)  # model selection
    write_bert_dir(os.path.join(out_dir, "bert"))
    last = (num_train - 1) // shard_size
    return {
        "image_root": out_dir,
        "train": os.path.join(out_dir, "train.json"),
        "test": os.path.join(out_dir, "test.json"),
        "val": os.path.join(out_dir, "val.json"),
        "shards": os.path.join(out_dir, "shards", f"train-{{000000..{last:06d}}}.tar"),
        "bert": os.path.join(out_dir, "bert"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the albef demo corpus.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate_corpus(
        args.out, args.num_train, args.num_test, args.image_size, args.seed, args.captions_per_image, args.shard_size
    )
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
