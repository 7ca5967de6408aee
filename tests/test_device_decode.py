"""data.decode=device: the workers pass JPEG bytes, the device decodes and augments them.

On CPU the "device" is the CPU (torchvision's libjpeg-turbo decoder instead of nvJPEG), which is
enough to check what the path promises: the same random draws per sample as the worker path, so
the same pixels up to resampling-kernel rounding; the same counted skips for bad files; the same
training losses; and a one-line ConfigError where a task has no device path."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef.data.collate import Collator
from albef.data.datasets import BadSample, CaptionDataset, webdataset_pipeline
from albef.data.device_decode import (DeviceDecodeError, EncodedImage, EncodedImages, device_decodable,
                                      stack_images)
from albef.data.transforms import train_transform
from albef.engine.trainer import Trainer, to_device
from albef.tasks.pretrain import PretrainTask
from albef.dist import DistInfo
from conftest import pretrain_config, tiny_corpus

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
ONE_LEVEL = 1 / 255 / 0.25  # one 8-bit grey level after Normalize(std=0.25)


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random RGB image (so that resampling kernels agree closely)."""
    noise = rng.random((height // 8 + 2, width // 8 + 2, 3))
    small = Image.fromarray((noise * 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.BICUBIC))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Five JPEGs (one greyscale, one CMYK), one PNG, a truncated JPEG, a text file."""
    root = tmp_path_factory.mktemp("device_decode")
    rng = np.random.default_rng(0)
    entries = []
    for i, (height, width) in enumerate([(90, 120), (64, 64), (120, 70), (100, 100)]):
        Image.fromarray(smooth_image(rng, height, width)).save(root / f"{i}.jpg", quality=95)
        entries.append(f"{i}.jpg")
    Image.fromarray(smooth_image(rng, 80, 96)).convert("L").save(root / "grey.jpg", quality=95)
    Image.fromarray(smooth_image(rng, 80, 96)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(smooth_image(rng, 50, 60)).save(root / "p.png")
    whole = (root / "0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "text.jpg").write_text("not an image")
    entries += ["grey.jpg", "cmyk.jpg", "p.png", "cut.jpg", "text.jpg"]
    annotations = root / "ann.json"
    annotations.write_text(json.dumps([{"image": name, "caption": f"picture {i}", "id": i}
                                       for i, name in enumerate(entries)]))
    return root, annotations


def both_paths(annotations: Path, root: Path, **transform) -> tuple[CaptionDataset, CaptionDataset]:
    make = lambda decode: CaptionDataset([str(annotations)], str(root), train_transform(  # noqa: E731
        48, MEAN, STD, decode=decode, **transform), seed=7)
    return make("workers"), make("device")


def test_device_path_makes_the_worker_paths_draws(files):
    """Crop box and flip are drawn per sample from the same seed: without RandAugment the device
    pixels equal the worker pixels to within one grey level (bicubic on tensors vs PIL)."""
    root, annotations = files
    workers, device = both_paths(annotations, root, randaugment=False)
    for epoch in (0, 1):
        workers.set_epoch(epoch)
        device.set_epoch(epoch)
        good = [i for i in range(len(workers)) if not isinstance(workers[i], BadSample)]
        assert len(good) == 7
        expected = torch.stack([workers[i]["image"] for i in good])
        encoded = [device[i]["image"] for i in good]
        assert [item.is_jpeg for item in encoded] == [True] * 5 + [False, False]  # CMYK and PNG: worker-decoded
        got = stack_images(encoded).to("cpu")
        assert got.shape == expected.shape == (7, 3, 48, 48)
        assert (got - expected).abs().max() <= 2 * ONE_LEVEL + 1e-6
    # another epoch draws other crops: the comparison above is not vacuous
    workers.set_epoch(0)
    first = workers[0]["image"]
    workers.set_epoch(1)
    assert (workers[0]["image"] - first).abs().mean() > 10 * ONE_LEVEL


def test_device_path_with_randaugment_picks_the_same_ops(files):
    """RandAugment draws its ops and magnitudes from the same seed; geometric ops interpolate a
    little differently on tensors, so the check is on the mean difference."""
    root, annotations = files
    workers, device = both_paths(annotations, root)
    good = [i for i in range(len(workers)) if not isinstance(workers[i], BadSample)]
    expected = torch.stack([workers[i]["image"] for i in good])
    got = stack_images([device[i]["image"] for i in good]).to("cpu")
    assert (got - expected).abs().mean() < 3 * ONE_LEVEL
    shuffled = torch.stack([workers[i]["image"] for i in good[1:] + good[:1]])
    assert (shuffled - expected).abs().mean() > 30 * ONE_LEVEL


def test_bad_files_are_the_same_counted_skips(files):
    root, annotations = files
    workers, device = both_paths(annotations, root)
    for index in (7, 8):  # truncated JPEG, text file
        assert isinstance(workers[index], BadSample) and isinstance(device[index], BadSample)
        assert workers[index].reason == device[index].reason
    collate = Collator(lambda *a, **k: {"input_ids": torch.zeros(7, 3, dtype=torch.long),
                                        "attention_mask": torch.ones(7, 3, dtype=torch.long)}, 8)
    batch = collate([device[i] for i in range(len(device))])
    assert isinstance(batch["images"], EncodedImages) and len(batch["images"]) == 7
    assert sum(batch["skipped"].values()) == 2
    moved = to_device(batch, torch.device("cpu"))
    assert moved["images"].shape == (7, 3, 48, 48) and moved["images"].dtype == torch.float32


def test_header_checks(files):
    root, _ = files
    whole = (root / "0.jpg").read_bytes()
    assert device_decodable(whole) and device_decodable((root / "grey.jpg").read_bytes())
    assert not device_decodable((root / "cmyk.jpg").read_bytes())
    assert not device_decodable(whole[: len(whole) // 2])  # no end-of-image marker
    assert not device_decodable((root / "p.png").read_bytes())


def test_a_jpeg_that_fails_on_the_device_names_its_file(files):
    root, _ = files
    whole = bytearray((root / "0.jpg").read_bytes())
    table = whole.index(b"\xff\xc4")  # a Huffman table: PIL's header parse passes, libjpeg fails
    broken = bytes(whole[:table + 5] + b"\xff" * 16 + whole[table + 21:])
    assert device_decodable(broken)
    good = EncodedImage(torch.frombuffer(bytearray(whole), dtype=torch.uint8), "good.jpg", 1,
                        train_transform(48, MEAN, STD, decode="device"))
    bad = EncodedImage(torch.frombuffer(bytearray(broken), dtype=torch.uint8), "broken.jpg", 2, good.transform)
    with pytest.raises(DeviceDecodeError, match="broken.jpg.*data.decode=workers"):
        EncodedImages([good, bad]).to("cpu")


def test_webdataset_device_path_matches_its_worker_path(tmp_path):
    corpus = tiny_corpus(tmp_path, num_train=6)
    streams = [webdataset_pipeline(corpus["shards"], train_transform(32, MEAN, STD, randaugment=False, decode=d),
                                   seed=3, caption_list="expand") for d in ("workers", "device")]
    workers, device = (list(stream) for stream in streams)
    assert len(workers) == len(device) == 12  # two captions per image: two samples, two seeds
    assert [s["index"] for s in workers] == [s["index"] for s in device]
    got = stack_images([s["image"] for s in device]).to("cpu")
    expected = torch.stack([s["image"] for s in workers])
    assert (got - expected).abs().max() <= 2 * ONE_LEVEL + 1e-6
    assert (expected[0] - expected[1]).abs().mean() > 5 * ONE_LEVEL  # the two captions' crops differ


@pytest.mark.slow
def test_training_losses_match_the_worker_path(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus", num_train=12)
    losses = {}
    for decode in ("workers", "device"):
        cfg = pretrain_config(corpus, tmp_path / decode, f"data.decode={decode}", "train.max_steps=3",
                              "train.log_every=1", "data.randaugment=false")
        Trainer(cfg, PretrainTask(), CPU).fit()
        rows = [json.loads(line) for line in (tmp_path / decode / "log.jsonl").read_text().splitlines()]
        losses[decode] = [row["loss"] for row in rows if "loss" in row]
    assert len(losses["workers"]) == 3
    assert np.allclose(losses["device"], losses["workers"], atol=2e-3), losses


@pytest.mark.slow
def test_tasks_without_a_device_path_refuse_it_in_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    from albef.data.synthetic import generate_reasoning_sets

    sets = generate_reasoning_sets(str(tmp_path / "r"), num_train=4, num_val=2, num_test=2, image_size=32)
    corpus = tiny_corpus(tmp_path / "corpus", num_train=4)
    result = subprocess.run(
        [sys.executable, "-m", "albef.tasks.ve", "--config", str(root / "configs" / "test_tiny.yaml"),
         "--output-dir", str(tmp_path / "run"), f"data.train_files=[{sets['ve_train']}]",
         f"data.image_root={sets['image_root']}", f"model.text.bert={corpus['bert']}", "data.decode=device"],
        cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "data.decode" in result.stderr and "data.decode=workers" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()
