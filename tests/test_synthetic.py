"""The demo corpus: deterministic, fully tokenisable, and read identically as JSON and WebDataset."""
import json
import os
from collections import defaultdict

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from albef.data.captions import pre_caption
from albef.data.datasets import BadSample, CaptionDataset, webdataset_pipeline
from albef.data.synthetic import generate_corpus, main
from albef.data.transforms import eval_transform

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    return generate_corpus(out, num_train=40, num_test=10, image_size=32, seed=3, shard_size=16)


def _captions(path):
    with open(path) as fp:
        return [c for entry in json.load(fp) for c in entry["caption"]]


def test_layout_and_determinism(corpus, tmp_path):
    again = str(tmp_path / "again")
    main(["--out", again, "--num-train", "40", "--num-test", "10", "--image-size", "32",
          "--seed", "3", "--shard-size", "16"])
    for name in ("train.json", "test.json", "bert/vocab.txt", "images/train_000007.jpg", "images/test_000002.jpg"):
        with open(os.path.join(corpus["image_root"], name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    assert sorted(os.listdir(os.path.join(again, "shards"))) == [f"train-00000{i}.tar" for i in range(3)]
    with open(corpus["test"]) as fp:
        test = json.load(fp)
    assert [e["image_id"] for e in test] == list(range(10))
    assert all(len(e["caption"]) == 2 for e in test)


def test_other_seed_differs(corpus, tmp_path):
    other = generate_corpus(str(tmp_path), num_train=40, num_test=10, image_size=32, seed=4, shard_size=16)
    assert _captions(other["train"]) != _captions(corpus["train"])


def test_tokenizer_covers_every_caption(corpus):
    tokenizer = AutoTokenizer.from_pretrained(corpus["bert"])
    config = AutoConfig.from_pretrained(corpus["bert"])
    assert config.model_type == "bert"
    assert config.vocab_size == len(tokenizer)
    captions = _captions(corpus["train"]) + _captions(corpus["test"])
    captions += [pre_caption(c, 30) for c in captions]
    ids = tokenizer(captions)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert tokenizer.unk_token_id in tokenizer("a € sign")["input_ids"]  # the check can fail


def _by_id(samples):
    out = defaultdict(lambda: {"captions": [], "images": []})
    for s in samples:
        assert not isinstance(s, BadSample), s
        out[s["id"]]["captions"].append(s["caption"])
        out[s["id"]]["images"].append(s["image"])
    return out


def test_json_and_webdataset_read_the_same_samples(corpus):
    transform = eval_transform(32, [0.5] * 3, [0.5] * 3)
    from_json = _by_id(CaptionDataset(corpus["train"], corpus["image_root"], transform, max_words=30,
                                      caption_list="expand"))
    from_wds = _by_id(webdataset_pipeline(corpus["shards"], transform, max_words=30, caption_list="expand"))
    assert sorted(from_json) == sorted(from_wds) == list(range(40))
    drawn = _by_id(webdataset_pipeline(corpus["shards"], transform, max_words=30))  # ALBEF: one drawn
    assert sorted(drawn) == list(range(40))
    assert all(len(d["captions"]) == 1 and d["captions"][0] in from_json[i]["captions"] for i, d in drawn.items())
    for image_id, expected in from_json.items():
        got = from_wds[image_id]
        assert sorted(got["captions"]) == sorted(expected["captions"])
        for image in got["images"] + expected["images"][1:]:
            assert torch.equal(image, expected["images"][0])
