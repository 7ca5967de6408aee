"""Captions, annotations, bad-sample accounting, collate, sampler resume, per-sample augmentation."""
import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from albef.data.captions import pre_caption
from albef.data.collate import Collator
from albef.data.datasets import (
    AnnotationError,
    BadDataError,
    BadSample,
    CaptionDataset,
    SkipCounter,
    build_train_loader,
    check_bad_fraction,
    load_annotations,
    set_epoch,
    webdataset_pipeline,
)
from albef.data.sampler import ResumableDistributedSampler
from albef.data.synthetic import write_bert_dir
from albef.data.transforms import eval_transform, train_transform

torch.set_num_threads(1)
UNIT = ([0.0] * 3, [1.0] * 3)  # normalisation that leaves pixels in [0, 1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bert"))
    write_bert_dir(path)
    return AutoTokenizer.from_pretrained(path)


def _jpeg(size=48, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path, data):
    with open(path, "w") as fp:
        json.dump(data, fp)
    return str(path)


# ----------------------------------------------------------------------------- captions

@pytest.mark.parametrize("raw, max_words, expected", [
    ("A Man's DOG, (running)!", 30, "a mans dog running"),
    ("black-and-white/photo of <person>", 30, "black and white photo of person"),
    ("  Two   cats;  on a mat.\n", 30, "two cats on a mat"),
    ("one two three four five", 3, "one two three"),
    ('"quoted" *#~: text?', 30, "quoted text"),
    ("...!!", 30, ""),
])
def test_pre_caption_matches_albef(raw, max_words, expected):
    assert pre_caption(raw, max_words) == expected


# ----------------------------------------------------------------------------- annotations

def test_load_annotations_expands_captions_and_assigns_ids(tmp_path):
    a = _write_json(tmp_path / "a.json", [
        {"image": "x.jpg", "caption": ["first", "second"]},
        {"image": "y.jpg", "caption": "third"},
    ])
    b = _write_json(tmp_path / "b.json", [
        {"image": "z.jpg", "caption": "fourth", "image_id": 7},
        {"image": "w.jpg", "caption": "fifth", "image_id": "coco-1"},
        {"image": "x.jpg", "caption": "sixth"},
    ])
    samples = load_annotations([a, b])
    assert [s["caption"] for s in samples] == ["first", "second", "third", "fourth", "fifth", "sixth"]
    ids = [s["id"] for s in samples]
    assert ids == [0, 0, 1, 2, 3, 0]  # consecutive; one image path, one id, across files


def test_image_ids_of_different_files_never_collide(tmp_path):
    a = _write_json(tmp_path / "coco.json", [{"image": "coco/1.jpg", "caption": "a", "image_id": 5}])
    b = _write_json(tmp_path / "vg.json", [{"image": "vg/1.jpg", "caption": "b", "image_id": 5},
                                           {"image": "vg/2.jpg", "caption": "c", "image_id": -100}])
    ids = [s["id"] for s in load_annotations([a, b])]
    assert ids == [0, 1, 2]  # same number in two files: two images; no id is negative (queue marker)


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"image": "a.jpg",\n   "caption": "x"\n   "image_id": 1}\n]\n')
    with pytest.raises(AnnotationError, match=r"bad\.json: invalid JSON at line 4, column 4"):
        load_annotations([str(path)])


@pytest.mark.parametrize("entry, message", [
    ({"image": "a.jpg"}, "entry 1: 'caption'"),
    ({"caption": "x"}, "entry 1: 'image'"),
    ({"image": "a.jpg", "caption": [3]}, "entry 1: 'caption'"),
    ({"image": "a.jpg", "caption": "x", "image_id": 1.5}, "entry 1: 'image_id'"),
    ("a.jpg", "entry 1: expected an object"),
])
def test_wrong_structure_names_file_and_entry(tmp_path, entry, message):
    path = _write_json(tmp_path / "ann.json", [{"image": "ok.jpg", "caption": "fine"}, entry])
    with pytest.raises(AnnotationError, match=f"ann.json: {message}"):
        load_annotations(path)


# ----------------------------------------------------------------------------- bad samples

@pytest.fixture
def image_dir(tmp_path):
    jpeg = _jpeg()
    (tmp_path / "good.jpg").write_bytes(jpeg)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (tmp_path / "garbage.jpg").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(500)))
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (20, 20), 3).save(tmp_path / "palette.png")
    Image.new("LA", (20, 20), (90, 128)).save(tmp_path / "la.png")
    grey16 = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    grey16.save(tmp_path / "grey16.png")
    (tmp_path / "folder.jpg").mkdir()  # open() raises IsADirectoryError
    return tmp_path


def test_caption_list_draws_one_caption_per_access_as_albef_or_expands(image_dir):
    ann = _write_json(image_dir / "lists.json", [{"image": "good.jpg", "caption": ["one", "two", "three", "four"]},
                                                 {"image": "good.jpg", "caption": "single"}])
    transform = eval_transform(16, *UNIT)
    expanded = CaptionDataset(ann, str(image_dir), transform, caption_list="expand")
    assert [expanded[i]["caption"] for i in range(len(expanded))] == ["one", "two", "three", "four", "single"]

    drawn, again = (CaptionDataset(ann, str(image_dir), transform, seed=3) for _ in range(2))  # the default
    assert len(drawn) == 2
    per_epoch = []
    for epoch in range(8):
        drawn.set_epoch(epoch)
        again.set_epoch(epoch)
        per_epoch.append(drawn[0]["caption"])
        assert again[0]["caption"] == per_epoch[-1] == drawn[0]["caption"]  # resumable: same draw
        assert drawn[1]["caption"] == "single"
    assert set(per_epoch) <= {"one", "two", "three", "four"} and len(set(per_epoch)) > 1


def test_each_broken_file_is_counted_and_odd_modes_are_converted(image_dir, tokenizer):
    files = ["good.jpg", "missing.jpg", "zero.jpg", "cut.jpg", "garbage.jpg",
             "good.jpg", "cmyk.jpg", "palette.png", "la.png", "grey16.png", "folder.jpg"]
    captions = ["a red circle"] * len(files)
    captions[5] = "?!..."
    ann = _write_json(image_dir / "ann.json", [{"image": f, "caption": c} for f, c in zip(files, captions)])
    dataset = CaptionDataset(ann, str(image_dir), eval_transform(16, *UNIT))
    samples = [dataset[i] for i in range(len(dataset))]
    reasons = {files[i] if s.reason != "empty_caption" else "caption": s.reason
               for i, s in enumerate(samples) if isinstance(s, BadSample)}
    assert reasons == {"missing.jpg": "missing", "zero.jpg": "empty_file", "cut.jpg": "truncated",
                       "garbage.jpg": "decode", "caption": "empty_caption", "folder.jpg": "unreadable"}

    batch = Collator(tokenizer, max_tokens=5)(samples)
    assert batch["skipped"] == {"missing": 1, "empty_file": 1, "truncated": 1, "decode": 1, "empty_caption": 1,
                                "unreadable": 1}
    assert batch["index"].tolist() == [0, 6, 7, 8, 9]
    assert batch["images"].shape == (5, 3, 16, 16)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, 5)
    cmyk, grey16 = batch["images"][1], batch["images"][4]
    assert cmyk[0].mean() > 0.9 and cmyk[1].mean() < 0.1  # CMYK (0, 255, 255, 0) is red
    assert torch.allclose(grey16, torch.full_like(grey16, round(40000 / 257) / 255), atol=1e-3)


def test_all_bad_batch_is_empty(tokenizer):
    batch = Collator(tokenizer, 8)([BadSample("missing", 0), BadSample("decode", 1)])
    assert batch["images"].shape[0] == batch["input_ids"].shape[0] == batch["ids"].numel() == 0
    assert batch["skipped"] == {"missing": 1, "decode": 1}


def _tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_webdataset_bad_samples_and_truncated_shard(tmp_path, tokenizer):
    jpeg = _jpeg(seed=1)
    _tar(tmp_path / "a.tar", [
        {"__key__": "good", "jpg": jpeg, "txt": b"a red circle", "json": b'{"image_id": 5}'},
        {"__key__": "latin1", "jpg": jpeg, "txt": "une id\xe9e".encode("latin-1")},
        {"__key__": "blank", "jpg": jpeg, "txt": b"   "},
        {"__key__": "noise", "jpg": b"not a jpeg at all", "txt": b"a blue square"},
        {"__key__": "list", "jpg": jpeg, "json": b'{"caption": ["one", "two"], "image_id": 6}'},
    ])
    _tar(tmp_path / "b.tar", [{"__key__": f"s{i}", "jpg": _jpeg(seed=i), "txt": b"a star"} for i in range(4)])
    whole = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[: len(whole) // 2 + 100])

    stream = webdataset_pipeline([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], eval_transform(16, *UNIT),
                                 caption_list="expand")
    samples = list(stream)
    bad = sorted(s.reason for s in samples if isinstance(s, BadSample))
    assert bad == ["decode", "empty_caption", "encoding", "truncated_shard"]
    good = [s for s in samples if not isinstance(s, BadSample)]
    assert {(s["caption"], s["id"]) for s in good if s["id"] in (5, 6)} == {("a red circle", 5), ("one", 6), ("two", 6)}
    assert 1 <= sum(s["caption"] == "a star" for s in good) < 4  # the shard's head survives, its tail is cut

    counter = SkipCounter()
    counter.update(Collator(tokenizer, 8)(samples))
    assert counter.seen == len(samples)
    assert counter.report().startswith(f"skipped 4/{len(samples)} samples")
    assert "truncated_shard=1" in counter.report()


def test_bad_fraction_bound():
    check_bad_fraction({"missing": 1}, seen=100, max_fraction=0.01)
    with pytest.raises(BadDataError, match=r"3 of 100 samples \(3\.00%\).*decode=1, missing=2.*max_bad_fraction=0\.01"):
        check_bad_fraction({"missing": 2, "decode": 1}, seen=100, max_fraction=0.01)
    counter = SkipCounter()
    counter.update({"index": torch.arange(8), "skipped": {"truncated": 2}})
    assert counter.all_reduce().state_dict() == {"counts": {"truncated": 2}, "seen": 10}
    with pytest.raises(BadDataError, match="truncated=2"):
        counter.check(0.1)


# ----------------------------------------------------------------------------- sampler

def _draw(sampler, batches, batch_size):
    order = list(sampler)
    return order[: batches * batch_size]


@pytest.mark.parametrize("new_world", [1, 2, 4])
def test_sampler_resume_on_another_world_size(new_world):
    n, batch_size, batches = 103, 4, 5
    old = [ResumableDistributedSampler(n, 2, r, seed=11) for r in range(2)]
    for s in old:
        s.set_epoch(3)
    assert torch.equal(old[0].permutation(), old[1].permutation())
    done = [i for s in old for i in _draw(s, batches, batch_size)]
    consumed = batches * batch_size * 2

    new = [ResumableDistributedSampler(n, new_world, r, seed=11) for r in range(new_world)]
    rest = []
    for s in new:
        s.set_epoch(3)
        s.set_start(consumed)
        rest += list(s)
        assert len(list(s)) == len(s)
    seen = done + rest
    assert len(seen) == len(set(seen))
    assert n - len(seen) == (n - consumed) % new_world  # only the drop_last tail is left out


def test_sampler_epochs_differ_and_padding_covers_everything():
    s = ResumableDistributedSampler(10, 3, 0, seed=0, drop_last=False)
    s.set_epoch(0)
    first = s.permutation()
    s.set_epoch(1)
    assert not torch.equal(first, s.permutation())
    union = [i for r in range(3) for i in ResumableDistributedSampler(10, 3, r, drop_last=False)]
    assert len(union) == 12 and set(union) == set(range(10))


# ----------------------------------------------------------------------------- augmentation

def test_per_sample_augmentation_is_deterministic_and_leaves_global_rng(tmp_path, tokenizer):
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(seed=i))
    ann = _write_json(tmp_path / "ann.json", [{"image": f"{i}.jpg", "caption": "a red circle"} for i in range(6)])
    dataset = CaptionDataset(ann, str(tmp_path), train_transform(24, *UNIT), seed=5)

    torch.manual_seed(123)
    random.seed(123)
    before = torch.get_rng_state(), random.getstate()
    dataset.set_epoch(1)
    first = dataset[3]["image"]
    assert torch.equal(first, dataset[3]["image"])
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    dataset.set_epoch(2)
    assert not torch.equal(first, dataset[3]["image"])

    loader = build_train_loader(dataset, Collator(tokenizer, 8), batch_size=3, num_workers=1, seed=0)
    assert torch.equal(torch.get_rng_state(), before[0])
    for epoch in (0, 1):  # persistent worker: the epoch must reach it through shared memory
        set_epoch(loader, epoch)
        in_worker = {int(i): img for batch in loader for i, img in zip(batch["index"], batch["images"])}
    assert sorted(in_worker) == list(range(6))
    assert torch.equal(in_worker[3], first)
    assert torch.equal(torch.get_rng_state(), before[0])


def test_webdataset_resume_skips_the_batches_already_drawn(tmp_path):
    for shard in range(2):
        _tar(tmp_path / f"{shard}.tar", [
            {"__key__": f"k{shard}_{i}", "jpg": _jpeg(size=8, seed=i), "txt": f"caption {shard} {i}".encode()}
            for i in range(5)
        ])
    stream = webdataset_pipeline(str(tmp_path / "{0..1}.tar"), eval_transform(8, *UNIT), seed=2)
    stream.set_epoch(4)
    full = [s["caption"] for s in stream]
    assert sorted(full) == sorted(f"caption {s} {i}" for s in range(2) for i in range(5))
    stream.set_epoch(5)
    assert [s["caption"] for s in stream] != full  # shard order follows the epoch
    stream.set_epoch(4)
    stream.set_start(batches=2, batch_size=3)
    assert [s["caption"] for s in stream] == full[6:]


def _images_by_index(samples):
    return {s["index"]: s["image"] for s in samples}


@pytest.mark.parametrize("kind", ["vqa", "ve", "nlvr"])
def test_persistent_workers_see_the_epoch_of_every_dataset(tmp_path, kind):
    """VQA and VE/NLVR2 training sets draw their augmentation from (seed, epoch, index) in the
    workers too: after set_epoch(1) a persistent worker gives what the main process computes
    for epoch 1 (it used to keep the epoch it started with)."""
    from albef.data.reasoning import ReasoningDataset
    from albef.data.synthetic import generate_reasoning_sets, generate_vqa_set
    from albef.data.vqa import VQATrainDataset

    transform = train_transform(24, *UNIT)
    if kind == "vqa":
        paths = generate_vqa_set(str(tmp_path), num_train=4, num_test=1, image_size=32)
        dataset = VQATrainDataset([paths["train"]], paths["image_root"], paths["image_root"], transform, seed=5)
    else:
        paths = generate_reasoning_sets(str(tmp_path), num_train=4, num_val=1, num_test=1, image_size=32)
        dataset = ReasoningDataset(kind, [paths[f"{kind}_train"]], paths["image_root"], transform, seed=5)
    loader = build_train_loader(dataset, _images_by_index, batch_size=2, num_workers=1, seed=0)
    for epoch in (0, 1):
        set_epoch(loader, epoch)
        in_worker = {i: image for batch in loader for i, image in batch.items()}
    dataset.set_epoch(1)
    assert len(in_worker) >= 4
    for index, image in in_worker.items():
        assert torch.equal(image, dataset[index]["image"])
    dataset.set_epoch(0)
    assert not torch.equal(in_worker[0], dataset[0]["image"])
