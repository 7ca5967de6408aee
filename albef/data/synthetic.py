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

`generate_reasoning_sets` writes small visual-reasoning sets from two-shape scenes, in the
formats of albef/data/reasoning.py, with sentences in the corpus vocabulary::

    out_dir/ve_{train,val,test}.json      "a red square to the left of a blue circle" about one
                                          scene: entailment (true) or contradiction (the relation
                                          reversed, one object or both objects not there)
    out_dir/nlvr_{train,val,test}.json    one such sentence and two scenes: true iff it holds
                                          in both (false: it fails in one or both)
    out_dir/images/{ve,nlvr}_*.jpg
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


# ----------------------------------------------------------------------------- reasoning sets

RELATION_TEMPLATES = {  # every word is in `vocabulary()`; {x}1 is left of / above {x}2
    "horizontal": (
        "a {color1} {shape1} to the left of a {color2} {shape2}",
        "a {color2} {shape2} to the right of a {color1} {shape1}",
        "a {color1} {shape1} on the left and a {color2} {shape2} on the right",
    ),
    "vertical": (
        "a {color1} {shape1} above a {color2} {shape2}",
        "a {color2} {shape2} below a {color1} {shape1}",
        "a {color1} {shape1} at the top and a {color2} {shape2} at the bottom",
    ),
}
_SLOTS = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}


@dataclass(frozen=True)
class Claim:
    """'(color1 shape1) is left of / above (color2 shape2)'."""

    layout: str
    first: tuple[str, str]  # (color, shape)
    second: tuple[str, str]

    def sentence(self, rng: random.Random) -> str:
        fields = dict(color1=self.first[0], shape1=self.first[1], color2=self.second[0], shape2=self.second[1])
        return _articles(rng.choice(RELATION_TEMPLATES[self.layout]).format(**fields))

    def holds(self, shapes: list[Shape], layout: str) -> bool:
        """True when the scene (two shapes in `layout`, first slot first) shows the claim."""
        return layout == self.layout and [(s.color, s.shape) for s in shapes] == [self.first, self.second]


def _random_object(rng: random.Random, other: tuple[str, str] | None = None) -> tuple[str, str]:
    while True:
        obj = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if obj != other:
            return obj


def _scene_of(rng: random.Random, layout: str, first: tuple[str, str], second: tuple[str, str]):
    """(background, shapes) with `first` in the first slot of `layout` and `second` in the other."""
    shapes = []
    for (color, shape), slot in zip((first, second), _SLOTS[layout]):
        x, y = POSITIONS[slot]
        center = (x + rng.uniform(-0.02, 0.02), y + rng.uniform(-0.02, 0.02))
        shapes.append(Shape(shape, color, rng.choice(list(SIZES)), center))
    return rng.choice(list(BACKGROUNDS)), shapes


def _false_scene(rng: random.Random, claim: Claim):
    """A two-shape scene where `claim` does not hold, one of three kinds equally often: the
    relation reversed (same objects), one object with another colour or shape, or two other
    objects. Returns (layout, background, shapes)."""
    kind = rng.choice(("reversed", "one object", "other objects"))
    first, second = claim.first, claim.second
    if kind == "reversed":
        first, second = second, first
    elif kind == "other objects":
        first = _changed(rng, first, second)
        second = _changed(rng, second, first)
    elif rng.random() < 0.5:
        first = _changed(rng, first, second)
    else:
        second = _changed(rng, second, first)
    return claim.layout, *_scene_of(rng, claim.layout, first, second)


def _changed(rng: random.Random, obj: tuple[str, str], other: tuple[str, str]) -> tuple[str, str]:
    """`obj` with its colour or its shape changed (never equal to `other`)."""
    while True:
        new = (rng.choice(list(COLORS)), obj[1]) if rng.random() < 0.5 else (obj[0], rng.choice(SHAPES))
        if new not in (obj, other):
            return new


def _random_claim(rng: random.Random) -> Claim:
    first = _random_object(rng)
    return Claim(rng.choice(list(RELATION_TEMPLATES)), first, _random_object(rng, first))


def _save(image: Image.Image, out_dir: str, path: str) -> str:
    with open(os.path.join(out_dir, path), "wb") as fp:
        fp.write(_jpeg(image))
    return path


def _ve_split(out_dir: str, split: str, count: int, side: int, rng: random.Random) -> list[dict]:
    entries = []
    for i in range(count):
        claim = _random_claim(rng)
        entailed = rng.random() < 0.5
        if entailed:
            background, shapes = _scene_of(rng, claim.layout, claim.first, claim.second)
        else:
            _, background, shapes = _false_scene(rng, claim)
        path = _save(render(background, shapes, side), out_dir, f"images/ve_{split}_{i:06d}.jpg")
        label = "entailment" if entailed else "contradiction"
        entries.append({"image": path, "sentence": claim.sentence(rng), "label": label})
    return entries


def _nlvr_split(out_dir: str, split: str, count: int, side: int, rng: random.Random) -> list[dict]:
    entries = []
    for i in range(count):
        claim = _random_claim(rng)
        label = rng.random() < 0.5
        # False: the claim fails in image 0, image 1 or both (each equally likely).
        fails = (False, False) if label else rng.choice(((True, False), (False, True), (True, True)))
        paths = []
        for number, fail in enumerate(fails):
            if fail:
                _, background, shapes = _false_scene(rng, claim)
            else:
                background, shapes = _scene_of(rng, claim.layout, claim.first, claim.second)
            paths.append(_save(render(background, shapes, side), out_dir, f"images/nlvr_{split}_{i:06d}_{number}.jpg"))
        entries.append({"images": paths, "sentence": claim.sentence(rng), "label": label})
    return entries


def generate_reasoning_sets(
    out_dir: str, num_train: int = 10_000, num_val: int = 400, num_test: int = 400, image_size: int = 64,
    seed: int = 1,
) -> dict[str, str]:
    """Write the VE and NLVR2 demo sets under `out_dir`; returns their annotation paths
    (``ve_train``, ``ve_val``, ``ve_test``, ``nlvr_train``, ...) and ``image_root``."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    paths = {"image_root": out_dir}
    for task, make in (("ve", _ve_split), ("nlvr", _nlvr_split)):
        for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
            entries = make(out_dir, split, count, image_size, rng)
            paths[f"{task}_{split}"] = os.path.join(out_dir, f"{task}_{split}.json")
            with open(paths[f"{task}_{split}"], "w", encoding="utf-8") as fp:
                json.dump(entries, fp, indent=0)
    return paths


# ----------------------------------------------------------------------------- VQA set (albef-vqa demo)

VQA_COUNTS = ("0", "1", "2")


def vqa_questions(rng: random.Random, shapes: list[Shape]) -> list[tuple[str, str]]:
    """Two (question, answer) pairs about a scene: the colour of a shape drawn once, and how many
    of some shape there are (drawn or not, half the time each)."""
    counts = {s: sum(item.shape == s for item in shapes) for s in SHAPES}
    unique = [item for item in shapes if counts[item.shape] == 1]
    pairs = []
    if unique:
        item = rng.choice(unique)
        pairs.append((f"what colour is the {item.shape}?", item.color))
    drawn = sorted({item.shape for item in shapes})
    asked = rng.choice(drawn if rng.random() < 0.5 else [s for s in SHAPES if not counts[s]])
    pairs.append((f"how many {asked}s are there?", str(counts[asked])))
    return pairs


def _human_answers(rng: random.Random, answer: str, num: int = 10, agreement: float = 0.9) -> list[str]:
    """`num` annotators: each gives `answer`, or with probability 1 - agreement another answer of its kind."""
    kind = VQA_COUNTS if answer in VQA_COUNTS else tuple(COLORS)
    return [answer if rng.random() < agreement else rng.choice([a for a in kind if a != answer]) for _ in range(num)]


def generate_vqa_set(out_dir: str, num_train: int = 2000, num_test: int = 200, image_size: int = 64,
                     seed: int = 1) -> dict[str, str]:
    """Write a VQA set of new scenes under `out_dir`, next to the caption corpus and sharing its
    vocabulary in bert/ (written if absent): images/vqa_{split}_NNNNNN.jpg, vqa_train.json,
    vqa_val.json and vqa_test.json (`num_test` scenes each; albef-vqa format, 10 noisy human
    answers per question, `answer_type` "other" (colour) or "number"), vqa_answer_list.json (8 colours, counts 0-2). CLI: ``python -m albef.data.synthetic --out demo_data --vqa``."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    paths = {"image_root": out_dir}
    for split, count, first_id in (("train", num_train, 0), ("val", num_test, 10_000_000),
                                   ("test", num_test, 20_000_000)):
        entries = []
        for i in range(count):
            background, shapes, _ = random_scene(rng, 1)
            path = f"images/vqa_{split}_{i:06d}.jpg"
            render(background, shapes, image_size).save(os.path.join(out_dir, path), quality=95)
            for j, (question, answer) in enumerate(vqa_questions(rng, shapes)):
                entries.append({"question_id": first_id + 10 * i + j, "question": question, "image": path,
                                "answer": _human_answers(rng, answer), "dataset": "vqa",
                                "answer_type": "number" if answer in VQA_COUNTS else "other"})
        paths[split] = os.path.join(out_dir, f"vqa_{split}.json")
        with open(paths[split], "w", encoding="utf-8") as fp:
            json.dump(entries, fp, indent=0)
    paths["answer_list"] = os.path.join(out_dir, "vqa_answer_list.json")
    with open(paths["answer_list"], "w", encoding="utf-8") as fp:
        json.dump([*COLORS, *VQA_COUNTS], fp)
    paths["bert"] = os.path.join(out_dir, "bert")
    if not os.path.isfile(os.path.join(paths["bert"], "vocab.txt")):
        write_bert_dir(paths["bert"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the albef demo corpus.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=None,
                        help="training examples (default: 2000; 10000 with --reasoning)")
    parser.add_argument("--num-test", type=int, default=None,
                        help="test (and val) examples (default: 200; 400 with --reasoning)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reasoning", action="store_true",
                        help="write the VE / NLVR2 sets (num-train, num-test each, val = test size) instead")
    parser.add_argument("--vqa", action="store_true",
                        help="write the VQA set of --num-train/--num-test new scenes instead (generate_vqa_set)")
    parser.add_argument("--grounding", action="store_true",
                        help="write the RefCOCO+-style grounding set instead (generate_grounding_set: "
                             "default 1000 training, 100 val and 100 test expressions)")
    args = parser.parse_args(argv)
    if args.grounding:
        kind = "grounding set"
        paths = generate_grounding_set(args.out, **{k: v for k, v in (
            ("num_train", args.num_train), ("num_val", args.num_test), ("num_test", args.num_test)) if v is not None},
            image_size=args.image_size, seed=args.seed)
        _report(kind, args.out, paths)
        return
    # NLVR2 needs more than the other demos: from 2,000 examples the demo checkpoint overfits at chance
    if args.num_train is None:
        args.num_train = 10_000 if args.reasoning else 2000
    if args.num_test is None:
        args.num_test = 400 if args.reasoning else 200
    kind = "VE / NLVR2 sets" if args.reasoning else "VQA set" if args.vqa else "demo corpus"
    if args.reasoning:
        paths = generate_reasoning_sets(
            args.out, args.num_train, args.num_test, args.num_test, args.image_size, args.seed)
    elif args.vqa:
        paths = generate_vqa_set(args.out, args.num_train, args.num_test, args.image_size, args.seed + 1)
    else:
        paths = generate_corpus(
            args.out, args.num_train, args.num_test, args.image_size, args.seed, args.captions_per_image,
            args.shard_size)
    _report(kind, args.out, paths)


def _report(kind: str, out: str, paths: dict) -> None:
    """Say what was written and where: a summary line, then the paths to put in a config."""
    images = os.path.join(out, "images")
    count = len(os.listdir(images)) if os.path.isdir(images) else 0
    print(f"wrote the {kind} to {os.path.abspath(out)} ({count} images now in {images}); its files:", flush=True)
    print(json.dumps(paths, indent=2), flush=True)



# ----------------------------------------------------------------------------- grounding set

GROUNDING_TEMPLATES = (
    "the {color} {shape}",
    "a {color} {shape}",
    "the {size} {color} {shape}",
    "the {shape} colored {color}",
)
GROUNDING_CORNERS = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73))  # never overlap at any size


def shape_box(item: Shape, side: int) -> list[int]:
    """Pixel box [x, y, w, h] of the drawn shape (its non-background pixels)."""
    mask = Image.new("RGB", (side, side), (0, 0, 0))
    draw_shape(ImageDraw.Draw(mask), item, side)
    x0, y0, x1, y1 = mask.getbbox()
    return [x0, y0, x1 - x0, y1 - y0]


def grounding_scene(rng: random.Random, num_shapes: int) -> tuple[str, list[Shape]]:
    """A background and `num_shapes` shapes in distinct corners, no two sharing a colour or a
    shape, so "the <colour> <shape>" names exactly one of them."""
    corners = rng.sample(GROUNDING_CORNERS, num_shapes)
    shapes = rng.sample(SHAPES, num_shapes)
    colors = rng.sample(list(COLORS), num_shapes)
    items = [Shape(s, c, rng.choice(list(SIZES)), corner) for s, c, corner in zip(shapes, colors, corners)]
    return rng.choice(list(BACKGROUNDS)), items


def _write_grounding_split(out_dir, split, count, side, rng, shapes_per_image, refs, dets, ref_id):
    """Scenes of one split: one reference per shape; boxes of every shape go to `dets`."""
    for i in range(count):
        background, items = grounding_scene(rng, shapes_per_image)
        path = f"images/{split}_{i:06d}.jpg"
        render(background, items, side).save(os.path.join(out_dir, path), quality=95)
        image_id = f"{split}_{i:06d}"
        boxes = [shape_box(item, side) for item in items]
        dets[image_id] = boxes
        for item, box in zip(items, boxes):
            text = _articles(rng.choice(GROUNDING_TEMPLATES).format(color=item.color, shape=item.shape, size=item.size))
            refs.append({"image": path, "text": text, "ref_id": ref_id, "image_id": image_id, "bbox": box,
                         "split": split})
            ref_id += 1
    return ref_id


def generate_grounding_set(
    out_dir: str,
    num_train: int = 1000,
    num_val: int = 100,
    num_test: int = 100,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, str]:
    """A tiny RefCOCO+-style grounding set of demo scenes, in ALBEF's grounding layout::

        out_dir/images/{train,val,testA,testB}_NNNNNN.jpg
        out_dir/train.json   [{image, text, ref_id}]   one expression per shape ("the red circle")
        out_dir/val.json     [{image, text, ref_id, image_id, bbox, split}]   split val
        out_dir/test.json    the same for splits testA (2 shapes per scene) and testB (3 shapes)
        out_dir/dets.json    {image_id: [[x, y, w, h], ...]}: the box of every shape in the image
        out_dir/bert/        the demo vocabulary (the same as the demo corpus's)

    Train and val scenes have 2 or 3 shapes; a random box pick is right 1/2 or 1/3 of the time.
    Returns the paths to put in the config.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    dets: dict[str, list[list[int]]] = {}
    files, ref_id = {}, 0
    for name, parts in (
        ("train", [("train", num_train // 2, 2), ("train", num_train - num_train // 2, 3)]),
        ("val", [("val", num_val // 2, 2), ("val", num_val - num_val // 2, 3)]),
        ("test", [("testA", num_test // 2, 2), ("testB", num_test - num_test // 2, 3)]),
    ):
        refs: list[dict] = []
        for n, (split, count, shapes_per_image) in enumerate(parts):
            tag = f"{split}{n}" if split in ("train", "val") else split  # image names of the two halves differ
            start = len(refs)
            ref_id = _write_grounding_split(out_dir, tag, count, image_size, rng, shapes_per_image, refs, dets, ref_id)
            for ref in refs[start:]:
                ref["split"] = split
        if name == "train":
            refs = [{"image": r["image"], "text": r["text"], "ref_id": r["ref_id"]} for r in refs]
        files[name] = os.path.join(out_dir, f"{name}.json")
        with open(files[name], "w", encoding="utf-8") as fp:
            json.dump(refs, fp, indent=0)
    with open(os.path.join(out_dir, "dets.json"), "w", encoding="utf-8") as fp:
        json.dump(dets, fp)
    write_bert_dir(os.path.join(out_dir, "bert"))
    return {"image_root": out_dir, **files, "dets": os.path.join(out_dir, "dets.json"),
            "bert": os.path.join(out_dir, "bert")}


def generate_zeroshot_set(out_dir: str, by: str = "shape", per_class: int = 30, image_size: int = 48,
                          seed: int = 7) -> list[str]:
    """An ImageFolder of single-shape scenes for zero-shot classification: `out_dir/<class>/*.jpg`
    with one class per shape (`by="shape"`) or per colour (`by="color"`); everything else (colour
    or shape, size, position, background) drawn at random. Returns the class names."""
    if by not in ("shape", "color"):
        raise ValueError(f"by must be 'shape' or 'color' (got {by!r})")
    rng = random.Random(seed)
    classes = list(SHAPES) if by == "shape" else list(COLORS)
    for name in classes:
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        for i in range(per_class):
            item = _random_shape(rng, rng.choice(list(POSITIONS)))
            item = Shape(name if by == "shape" else item.shape, name if by == "color" else item.color,
                         item.size, item.center)
            background = rng.choice(list(BACKGROUNDS))
            with open(os.path.join(out_dir, name, f"{i:04d}.jpg"), "wb") as fp:
                fp.write(_jpeg(render(background, [item], image_size)))
    return classes


if __name__ == "__main__":
    main()
