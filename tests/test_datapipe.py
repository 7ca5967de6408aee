"""Data pipeline speed paths: JPEG draft decode, shard writer, data-wait warning."""
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from albef.data.captions import pre_caption
from albef.data.datasets import (CaptionDataset, decode_image, load_annotations, read_image, sample_seed,
                                 webdataset_pipeline)
from albef.data.synthetic import generate_corpus
from albef.data.transforms import eval_transform, jpeg_draft_scale, train_transform
from albef.engine.logging import MetricLogger
import pytest

pytestmark = pytest.mark.slow

UNIT = ([0.0] * 3, [1.0] * 3)


def _jpeg(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)  # smooth, JPEG-like content
    image.save(path, quality=90)
    return path


def test_jpeg_draft_scale_keeps_every_crop_at_image_size():
    # ALBEF: 256 px, crop area >= 0.2, aspect 3/4..4/3 -> the shorter crop side is >= sqrt(0.15 * W'H')
    for width, height in [(640, 480), (1400, 1400), (2000, 1500), (4000, 3000), (9000, 600), (300, 200)]:
        scale = jpeg_draft_scale((width, height), 256, 0.2, 0.75)
        w, h = math.ceil(width / scale), math.ceil(height / scale)
        if scale > 1:
            assert min(w, h) >= 256 and math.sqrt(0.2 * 0.75 * w * h) >= 256
        # the next larger reduction would break the guarantee (the scale is the largest allowed)
        if scale < 8:
            w2, h2 = math.ceil(width / (2 * scale)), math.ceil(height / (2 * scale))
            assert min(w2, h2) < 256 or 0.2 * 0.75 * w2 * h2 < 256**2
    assert jpeg_draft_scale((640, 480), 256, 0.2, 0.75) == 1  # COCO-sized: full decode
    assert jpeg_draft_scale((4000, 3000), 256, 0.2, 0.75) == 4
    assert jpeg_draft_scale((4000, 3000), 256) == 8  # eval resize: only min side >= 256 needed


def test_jpeg_draft_decodes_smaller_and_keeps_output_shape(tmp_path):
    path = str(_jpeg(tmp_path / "big.jpg", 1024, 768))
    drafted = train_transform(64, *UNIT, jpeg_draft=True)
    assert read_image(path).size == (1024, 768)
    small = read_image(path, drafted.draft_size)
    assert small.size == (256, 192)  # 1/4: sqrt(0.15 * 256 * 192) = 86 >= 64, 1/8 would give 60
    with open(path, "rb") as fp:
        assert decode_image(fp.read(), "big", drafted.draft_size).size == (256, 192)
    png = tmp_path / "big.png"
    Image.open(path).save(png)
    assert read_image(str(png), drafted.draft_size).size == (1024, 768)  # draft is JPEG-only
    ann = tmp_path / "ann.json"
    ann.write_text('[{"image": "big.jpg", "caption": "a big picture"}]')
    for transform in (drafted, eval_transform(64, *UNIT, jpeg_draft=True)):
        sample = CaptionDataset(str(ann), str(tmp_path), transform)[0]
        assert sample["image"].shape == (3, 64, 64)
    # the drafted pixels approximate the full decode (same picture, slightly different pixels)
    full = CaptionDataset(str(ann), str(tmp_path), eval_transform(64, *UNIT))[0]["image"]
    near = CaptionDataset(str(ann), str(tmp_path), eval_transform(64, *UNIT, jpeg_draft=True))[0]["image"]
    assert (full - near).abs().mean() < 0.02


def test_jpeg_draft_off_is_the_plain_decode(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", 1024, 768, seed=1)
    ann = tmp_path / "ann.json"
    ann.write_text('[{"image": "big.jpg", "caption": "a big picture"}]')
    with Image.open(path) as image:
        plain = np.asarray(image.convert("RGB"))
    off = train_transform(64, *UNIT)
    assert off.draft_size is None and np.array_equal(np.asarray(read_image(str(path), off.draft_size)), plain)
    # the transform output with the switch off equals the transform applied to the plain decode
    sample = CaptionDataset(str(ann), str(tmp_path), off, seed=4)[0]
    torch.manual_seed(sample_seed(4, 0, 0))  # the dataset's per-sample seed (seed 4, epoch 0, index 0)
    expected = train_transform(64, *UNIT)(Image.fromarray(plain))
    assert torch.equal(sample["image"], expected)
    drafted = CaptionDataset(str(ann), str(tmp_path), train_transform(64, *UNIT, jpeg_draft=True), seed=4)[0]
    assert drafted["image"].shape == sample["image"].shape


def _windows(logger, waits, start=1):
    """One log window per entry: a window whose step waited `wait` seconds (clamped to 100%)."""
    for i, wait in enumerate(waits, start):
        logger.update({"loss": torch.tensor(1.0)}, images=4, data_wait=wait)
        logger.log(i, 0, {})


def _data_wait_events(output_dir):
    lines = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("event") == "data_wait"]


def test_data_wait_warning_after_three_slow_windows(tmp_path, capsys):
    logger = MetricLogger(tmp_path, enabled=True, log_every=1)
    logger.DATA_WAIT_REPEAT = 4
    # slow, slow, fast (streak broken), slow x3 -> warn at window 6, then again at 10
    _windows(logger, [1e3, 1e3, 0.0, 1e3, 1e3, 1e3, 1e3, 1e3, 1e3, 1e3, 0.0, 1e3, 1e3])
    logger.close()
    events = _data_wait_events(tmp_path)
    assert [e["step"] for e in events] == [6, 10]
    assert events[0]["windows"] == 3 and events[0]["fraction"] == 1.0
    assert "data.num_workers" in events[0]["advice"]
    assert "data_wait" in capsys.readouterr().out


def test_no_data_wait_warning_when_the_data_keeps_up(tmp_path):
    logger = MetricLogger(tmp_path, enabled=True, log_every=1)
    _windows(logger, [0.0] * 8 + [1e3, 1e3] + [0.0])
    logger.close()
    assert _data_wait_events(tmp_path) == []


def _make_shards_module():
    spec = importlib.util.spec_from_file_location("make_shards", Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_shards"] = module  # its worker processes find encode_entry by module name
    spec.loader.exec_module(module)
    return module


def test_make_shards_round_trip(tmp_path):
    corpus = generate_corpus(str(tmp_path / "corpus"), num_train=11, num_test=2, num_val=2, image_size=64,
                             captions_per_image=2, shard_size=100)
    (tmp_path / "corpus" / "images" / "train_000003.jpg").write_bytes(b"")  # one unreadable image
    make_shards = _make_shards_module()
    assert make_shards.main([corpus["train"], "--image-root", corpus["image_root"], "--out", str(tmp_path / "s"),
                             "--size", "40", "--shard-size", "4", "--workers", "2", "--quality", "90"]) == 0
    result = make_shards.make_shards([corpus["train"]], corpus["image_root"], str(tmp_path / "t"), size=40,
                                     shard_size=4)
    assert result["num_samples"] == 10 and result["skipped"] == {"empty_file": 1}
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [f"shard-{i:06d}.tar" for i in range(3)]
    # raw shard contents: images of the requested size, the JSON path's ids and caption lists
    expected = {a["id"]: a["caption"] for a in load_annotations(corpus["train"], expand=False)
                if a["image"] != "images/train_000003.jpg"}
    raw = {}
    for sample in wds.WebDataset(sorted(str(p) for p in (tmp_path / "t").iterdir()), shardshuffle=False):
        meta = json.loads(sample["json"])
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG" and image.size == (40, 40)  # 64 x 64 -> shorter side 40
        raw[meta["image_id"]] = meta["caption"]
    assert raw == expected
    # the training reader (data.format: wds) reads them back: same ids and cleaned captions
    stream = webdataset_pipeline(result["shards"], eval_transform(32, *UNIT), caption_list="expand")
    got = sorted((s["id"], s["caption"]) for s in stream)
    assert got == sorted((i, pre_caption(c, 30)) for i, caps in expected.items() for c in caps)
    assert next(iter(stream))["image"].shape == (3, 32, 32)


def test_make_shards_rejects_bad_arguments(tmp_path, capsys):
    make_shards = _make_shards_module()
    assert make_shards.main(["x.json", "--out", str(tmp_path), "--quality", "0"]) == 2
    assert make_shards.main([str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--quality=0" in err and "missing.json" in err
