"""Weakly supervised grounding: Grad-CAM, ALBEF's box scoring and IoU accuracy, pictures, data."""
import json
import random

import numpy as np
import pytest
import torch
from conftest import make_batch, make_model
from PIL import Image

from albef.data.grounding import load_boxes, load_refs
from albef.data.synthetic import generate_grounding_set, shape_box
from albef.gradcam import gradcam, gradcam_token_maps, upsample_map
from albef.metrics import box_iou, grounding_accuracy, pick_box, score_boxes
from albef.visualize import figure_size, gradcam_figure, save_png

# ----------------------------------------------------------------------------- metric vs brute force


def _pixels(box):
    x, y, w, h = box
    grid = np.zeros((80, 80), dtype=bool)
    grid[y : y + h, x : x + w] = True
    return grid


def _brute_iou(a, b):
    """IoU by counting pixels; ALBEF's convention drops an overlap only one pixel wide or tall."""
    both = _pixels(a) & _pixels(b)
    rows, cols = both.any(axis=1).sum(), both.any(axis=0).sum()
    inter = int(both.sum()) if rows > 1 and cols > 1 else 0
    return inter / (int(_pixels(a).sum()) + int(_pixels(b).sum()) - inter)


def test_iou_equals_pixel_count():
    rng = random.Random(0)
    boxes = [[rng.randrange(0, 40), rng.randrange(0, 40), rng.randrange(1, 40), rng.randrange(1, 40)] for _ in range(300)]
    for a, b in zip(boxes, boxes[1:]):
        assert box_iou(a, b) == pytest.approx(_brute_iou(a, b), abs=1e-12)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    assert box_iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)


def test_box_scores_equal_pixel_loop():
    gen = torch.Generator().manual_seed(0)
    heat = torch.rand(30, 40, generator=gen, dtype=torch.float64)
    rng = random.Random(1)
    boxes = [[rng.uniform(0, 35), rng.uniform(0, 25), rng.uniform(0.5, 20), rng.uniform(0.5, 20)] for _ in range(50)]
    scores = score_boxes(heat, boxes, alpha=0.5)
    for (x, y, w, h), score in zip(boxes, scores):
        total = sum(heat[r, c].item() for r in range(int(y), min(int(y + h), 30)) for c in range(int(x), min(int(x + w), 40)))
        assert score.item() == pytest.approx(total / (w * h) ** 0.5, rel=1e-9)
    best = max(range(len(boxes)), key=lambda i: (scores[i].item(), -i))
    assert pick_box(heat, boxes) == best
    assert score_boxes(heat, [[1, 1, 0, 5]])[0] == float("-inf")


def test_accuracy_equals_count():
    rng = random.Random(2)
    splits = [rng.choice(["val", "testA", "testB"]) for _ in range(200)]
    ious = [rng.random() for _ in range(200)]
    ious[0], splits[0] = 0.5, "val"  # the threshold itself counts as found
    result = grounding_accuracy(splits, ious)
    for split in ("val", "testA", "testB"):
        hits = total = 0
        for s, iou in zip(splits, ious):
            if s == split:
                total += 1
                hits += iou >= 0.5
        assert result[f"{split}_d"] == hits / total
    assert grounding_accuracy(["val"], [0.2]) == {"val_d": 0.0}


# ----------------------------------------------------------------------------- Grad-CAM


def _rig_attention_to_patch(model, block_num, patch, strength=20.0):
    """Make layer `block_num`'s cross-attention attend (almost) only to image patch `patch`:
    the ViT emits zeros except a constant vector at that patch, keys read that vector, queries
    are a constant. Returns the hook handle."""
    vit = model.visual_encoder
    prefix = vit.num_prefix_tokens

    def fake_tokens(module, inputs, output):
        tokens = torch.zeros_like(output)
        tokens[:, prefix + patch] = 1.0
        return tokens

    handle = vit.register_forward_hook(fake_tokens)
    attn = model.text_encoder.bert.encoder.layer[block_num].crossattention.self
    with torch.no_grad():
        attn.query.weight.zero_()
        attn.query.bias.fill_(1.0)
        attn.key.weight.fill_(strength / attn.key.weight.shape[1])
        attn.key.bias.zero_()
    return handle


@pytest.mark.parametrize("patch", [5, 14])
def test_gradcam_peaks_on_attended_patch(tmp_path, patch):
    model = make_model(tmp_path).eval()
    block_num = 3  # fusion layers are 2 and 3 in the tiny config
    handle = _rig_attention_to_patch(model, block_num, patch)
    images, input_ids, attention_mask = make_batch(3)
    _, maps = model.text_encoder.bert(input_ids, attention_mask, model.visual_encoder(images), mode="multimodal",
                                      output_attentions=True)
    assert maps[block_num - 2][..., 1 + patch].min() > 0.99  # the rig holds
    cams = gradcam(model, images, input_ids, attention_mask, block_num)
    if cams.flatten(1)[:, patch].max() <= 0:  # the ITM logit decreased with that patch: flip its sign
        with torch.no_grad():
            model.itm_head.weight[1].neg_()
            model.itm_head.bias[1].neg_()
        cams = gradcam(model, images, input_ids, attention_mask, block_num)
    handle.remove()
    assert cams.shape == (3, 4, 4)
    assert (cams >= 0).all()
    assert (cams.flatten(1).argmax(dim=1) == patch).all()
    assert all(p.grad is None for p in model.parameters())  # gradients are taken w.r.t. the maps only


def test_gradcam_token_maps_mask_padding_and_average(tmp_path):
    model = make_model(tmp_path).eval()
    images, input_ids, attention_mask = make_batch(3)
    token_maps, logits = gradcam_token_maps(model, images, input_ids, attention_mask, 2)
    assert token_maps.shape == (3, 9, 4, 4) and logits.shape == (3, 2)
    assert (token_maps[attention_mask == 0] == 0).all()
    assert torch.allclose(gradcam(model, images, input_ids, attention_mask, 2), token_maps.mean(dim=1))
    with pytest.raises(ValueError, match="grounding.block_num=1 is not a fusion layer"):
        gradcam(model, images, input_ids, attention_mask, 1)


def test_gradcam_matches_hand_computation(tmp_path):
    """The map is mean over heads and tokens of mask * attention * clamp(d ITM+ / d attention, 0)."""
    model = make_model(tmp_path).eval()
    images, input_ids, attention_mask = make_batch(2)
    image_embeds = model.visual_encoder(images)
    hidden, maps = model.text_encoder.bert(input_ids, attention_mask, image_embeds, mode="multimodal",
                                           output_attentions=True)
    attention = maps[1]  # layer 3
    attention.retain_grad()
    model.itm_head(hidden[:, 0])[:, 1].sum().backward()
    mask = attention_mask[:, None, :, None].float()
    expected = (attention * attention.grad.clamp(min=0) * mask)[..., 1:].mean(dim=(1, 2)).reshape(2, 4, 4)
    assert torch.allclose(gradcam(model, images, input_ids, attention_mask, 3), expected, atol=1e-7)


def test_upsample_is_bicubic_to_image_size():
    cam = torch.zeros(4, 4)
    cam[1, 2] = 1.0
    heat = upsample_map(cam, 30, 50)
    assert heat.shape == (30, 50)
    row, col = divmod(int(heat.argmax()), 50)
    assert 7 <= row <= 15 and 25 <= col <= 37  # cell (1, 2) of a 4 x 4 grid over 30 x 50 pixels


# ----------------------------------------------------------------------------- pictures


def test_png_has_expected_size(tmp_path):
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    cam = np.zeros((4, 4))
    cam[0, 3] = 1.0
    picture = gradcam_figure(image, "the red square", cam, box=[40, 0, 20, 12], true_box=[38, 1, 22, 12],
                             token_maps=np.random.rand(2, 4, 4), tokens=["red", "square"], dpi=50)
    path = tmp_path / "out" / "example.png"
    save_png(picture, str(path))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == figure_size(4, 50) == (600, 175)
    assert picture.shape == (175, 600, 3) and picture.std() > 0


# ----------------------------------------------------------------------------- data


def test_grounding_set_boxes_and_refs(tmp_path):
    paths = generate_grounding_set(str(tmp_path / "g"), num_train=6, num_val=4, num_test=4, image_size=48)
    train = json.loads(open(paths["train"]).read())
    assert set(train[0]) == {"image", "text", "ref_id"}
    refs = load_refs([paths["val"], paths["test"]])
    dets = load_boxes(paths["dets"])
    assert {r["split"] for r in refs} == {"val", "testA", "testB"}
    for ref in refs:
        assert ref["bbox"] in dets[ref["image_id"]]  # the true box is one of the candidates
        image = np.asarray(Image.open(tmp_path / "g" / ref["image"]).convert("RGB"), dtype=float)
        x, y, w, h = (int(v) for v in ref["bbox"])
        background = image[0, 0] if not (x == 0 and y == 0) else image[-1, -1]
        inside = np.abs(image[y : y + h, x : x + w] - background).sum(-1) > 60
        assert inside.mean() > 0.3  # the shape is drawn inside its box
    assert len({r["ref_id"] for r in refs}) == len(refs)


def test_refs_file_supplies_missing_fields(tmp_path):
    (tmp_path / "val.json").write_text(json.dumps([{"image": "a.jpg", "text": "the red circle", "ref_id": 7}]))
    with pytest.raises(Exception, match=r"ref_id 7\) lacks \['image_id', 'bbox', 'split'\]"):
        load_refs([str(tmp_path / "val.json")])
    (tmp_path / "refs.json").write_text(json.dumps({"7": {"image_id": 3, "bbox": [1, 2, 3, 4], "split": "testB"}}))
    (ref,) = load_refs([str(tmp_path / "val.json")], str(tmp_path / "refs.json"))
    assert ref["image_id"] == 3 and ref["bbox"] == [1.0, 2.0, 3.0, 4.0] and ref["split"] == "testB"


def test_shape_box_is_tight():
    from albef.data.synthetic import Shape

    x, y, w, h = shape_box(Shape("square", "red", "large", (0.5, 0.5)), 100)
    assert abs(w - 32) <= 2 and abs(h - 32) <= 2 and abs(x + w / 2 - 50) <= 1.5


# ----------------------------------------------------------------------------- the task on the engine

from pathlib import Path  # noqa: E402

from conftest import DOWNSTREAM, needs_original, write_original_bert  # noqa: E402

from albef.checkpoint import load_checkpoint_file, map_albef_keys  # noqa: E402
from albef.config import Config, load_config  # noqa: E402
from albef.engine.trainer import init_weights  # noqa: E402
from albef.models import build_tokenizer  # noqa: E402
from albef.tasks.grounding import GroundingTask, evaluate_grounding, main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16, "mlp_ratio": 4.0}


@pytest.fixture(scope="module")
def gset(tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding")
    generate_grounding_set(str(out), num_train=16, num_val=4, num_test=4, image_size=32)
    return out


def _args(gset: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "test_tiny.yaml"), "--output-dir", str(run),
            f"model.text.bert={gset / 'bert'}", f"data.train_files=[{gset / 'train.json'}]",
            f"data.image_root={gset}", f"eval.image_root={gset}", f"eval.val_files=[{gset / 'val.json'}]",
            f"eval.test_files=[{gset / 'test.json'}]", f"grounding.det_file={gset / 'dets.json'}",
            "grounding.block_num=3", "loss.weights.mlm=0", "loss.same_id_positives=true", *extra]


@pytest.mark.slow
def test_train_evaluate_and_visualize_on_the_demo_grounding_set(gset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(gset, run, "train.max_steps=3")) == 0
    out = capsys.readouterr().out
    assert "detections" in out and "accuracy (%) at IoU >= 0.5" in out
    assert (run / "best.pt").is_file()
    val = json.loads((run / "results" / "val_latest.json").read_text())
    test = json.loads((run / "results" / "test_latest.json").read_text())
    assert set(val) >= {"val_d", "num_refs"} and set(test) >= {"testA_d", "testB_d"}

    # the accuracy is the IoU >= 0.5 fraction of the written picks, recomputed by hand
    refs = {r["ref_id"]: r for r in load_refs([str(gset / "test.json")])}
    picks = json.loads((run / "results" / "grounding_test.json").read_text())
    dets = load_boxes(str(gset / "dets.json"))
    assert len(picks) == len(refs) == test["num_refs"]
    for split in ("testA", "testB"):
        mine = [p for p in picks if p["split"] == split]
        hits = sum(_brute_iou([int(v) for v in refs[p["ref_id"]]["bbox"]], [int(v) for v in p["box_d"]]) >= 0.5
                   for p in mine)
        assert test[f"{split}_d"] == pytest.approx(100.0 * hits / len(mine))  # in %
        assert all(p["box_d"] in dets[refs[p["ref_id"]]["image_id"]] for p in mine)

    # --evaluate of best.pt reproduces the test accuracy
    assert main(_args(gset, tmp_path / "eval", "--evaluate", "--init-from", str(run / "best.pt"))) == 0
    assert json.loads((tmp_path / "eval" / "results" / "test_latest.json").read_text()) == test

    # --visualize: references of eval.val_files, and any image + text
    vis = tmp_path / "vis"
    assert main(_args(gset, vis, "--visualize", "--init-from", str(run / "best.pt"), "grounding.visualize_count=2")) == 0
    pngs = sorted((vis / "gradcam").glob("*.png"))
    assert len(pngs) == 2 and list((vis / "tb").iterdir())
    image = gset / json.loads((gset / "val.json").read_text())[0]["image"]
    assert main(_args(gset, vis, "--visualize", "--init-from", str(run / "best.pt"), "--image", str(image),
                      "--text", "the red circle", "--text", "a blue square")) == 0
    drawn = sorted((vis / "gradcam").glob(f"*_{image.stem}.png"))
    assert len(drawn) == 2
    with Image.open(drawn[0]) as png:  # image, Grad-CAM and one panel per word ("the", "red", "circle")
        from albef.visualize import figure_size
        assert png.size == figure_size(5, 100)


def test_evaluation_with_rigged_maps_picks_the_box_under_the_peak(gset, tmp_path, monkeypatch):
    """With a Grad-CAM that lights up exactly the true box, every reference is found."""
    import albef.tasks.grounding as grounding

    cfg = load_config(str(CONFIGS / "test_tiny.yaml"), _args(gset, tmp_path)[4:])
    refs = load_refs([str(gset / "val.json")])
    in_order = iter(refs)  # one process: the loader yields the references in file order

    def perfect(model, images, input_ids, attention_mask, block_num, mode="itm"):
        cams = torch.zeros(len(images), 32, 32)
        for cam, ref in zip(cams, in_order):
            x, y, w, h = (int(v) for v in ref["bbox"])
            cam[y : y + h, x : x + w] = 1.0
        return cams

    monkeypatch.setattr(grounding, "gradcam", perfect)
    monkeypatch.setattr(grounding, "upsample_map", lambda cam, h, w: cam)
    model = GroundingTask().build_model(cfg)
    result, records = evaluate_grounding(model, build_tokenizer(cfg.model), cfg, [str(gset / "val.json")], "cpu")
    assert result["num_refs"] == len(refs) and result["val_d"] == 1.0
    dets = load_boxes(str(gset / "dets.json"))
    ints = lambda box: [int(v) for v in box]  # noqa: E731
    chance = [sum(_brute_iou(ints(r["bbox"]), ints(b)) >= 0.5 for b in dets[r["image_id"]]) / len(dets[r["image_id"]])
              for r in refs]
    assert result["val_d_chance"] == pytest.approx(sum(chance) / len(chance))
    assert all(r["iou_d"] == 1.0 for r in records)


@pytest.mark.slow
def test_user_mistakes_are_one_line(gset, tmp_path, capsys):
    assert main(_args(gset, tmp_path / "a", "grounding.block_num=1")) == 2
    assert "grounding.block_num=1 is not a fusion layer" in capsys.readouterr().err
    assert main(_args(gset, tmp_path / "b", "loss.weights.mlm=1")) == 2
    assert "loss.weights.mlm" in capsys.readouterr().err
    bad = tmp_path / "val.json"
    bad.write_text(json.dumps([{"image": "x.jpg", "text": "the red circle", "ref_id": 1}]))
    assert main(_args(gset, tmp_path / "c", f"eval.val_files=[{bad}]")) == 2
    err = capsys.readouterr().err
    assert "lacks ['image_id', 'bbox', 'split']" in err and err.count("\n") == 1
    assert main(_args(gset, tmp_path / "d", "--visualize", "--image", str(tmp_path / "none.jpg"), "--text", "x",
                      "--init-from", str(gset / "dets.json"))) == 2


@needs_original(DOWNSTREAM / "tiny_retrieval.pth")
def test_the_originals_grounding_checkpoint_loads_and_explains(tmp_path):
    """tiny_retrieval.pth is also ALBEF's grounding model: nothing missing or unexpected, and
    Grad-CAM at ALBEF's default layer 8 runs on it."""
    bert = write_original_bert(tmp_path / "bert", DOWNSTREAM / "configs" / "config_bert_tiny_l12.json")
    cfg = Config.from_dict({
        "model": {"embed_dim": 32, "queue_size": 16, "vision": {"image_size": 96, "pretrained": False, **TINY_VIT},
                  "text": {"bert": str(bert), "pretrained": False, "fusion_layer": 6}},
        "loss": {"weights": {"itc": 1.0, "itm": 1.0, "mlm": 0.0}, "same_id_positives": True},
    })
    assert cfg.grounding.block_num == 8
    task = GroundingTask()
    model = task.build_model(cfg)
    path = DOWNSTREAM / "tiny_retrieval.pth"
    report = init_weights(task, model, path, cfg)
    assert not (report.skipped or report.new or report.resampled or report.reinitialised)
    assert set(report.unexpected) <= {"text_encoder.bert.embeddings.position_ids",
                                      "text_encoder_m.bert.embeddings.position_ids"}
    source = map_albef_keys(load_checkpoint_file(path)["model"])
    assert all(torch.equal(value, source[key]) for key, value in model.state_dict().items())
    model.eval()
    ids = torch.tensor([[101, 2417, 4418, 102], [101, 2630, 102, 0]])
    cams = gradcam(model, torch.randn(2, 3, 96, 96), ids, (ids > 0).long(), 8)
    assert cams.shape == (2, 6, 6) and torch.isfinite(cams).all() and (cams >= 0).all() and cams.sum() > 0


def test_grounding_training_sees_the_whole_image():
    """ALBEF's grounding augmentation resizes instead of cropping: without flip and RandAugment
    it is the evaluation transform."""
    from albef.data.transforms import eval_transform, train_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    mean, std = [0.5] * 3, [0.25] * 3
    whole = train_transform(32, mean, std, randaugment=False, hflip=False, crop=False)(image)
    assert torch.equal(whole, eval_transform(32, mean, std)(image))
    assert train_transform(32, mean, std, crop=False)(image).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- REFER conversion

import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from albef.data.datasets import AnnotationError  # noqa: E402
from albef.data.grounding import read_refer_refs, refer_refs_file  # noqa: E402

REFS = [
    {"ref_id": 7, "ann_id": 100, "image_id": 55, "split": "testA", "category_id": 1, "file_name": "a_7.jpg",
     "sent_ids": [1, 2], "sentences": [{"raw": "Man left", "sent": "man left", "sent_id": 1, "tokens": ["man"]}]},
    {"ref_id": 9, "ann_id": 101, "image_id": 56, "split": "val", "category_id": 2, "file_name": "b_9.jpg",
     "sent_ids": [3], "sentences": [{"raw": "dog", "sent": "dog", "sent_id": 3, "tokens": ["dog"]}]},
]
INSTANCES = {"images": [{"id": 55}, {"id": 56}], "categories": [],
             "annotations": [{"id": 100, "bbox": [1, 2, 30, 40], "image_id": 55},
                             {"id": 101, "bbox": [5.5, 6, 7, 8], "image_id": 56}]}

# A REFER-style Python 2 pickle (protocol 2, byte strings as SHORT_BINSTRING, no globals) of
# [{"ref_id": 3, "ann_id": 100, "image_id": 55, "split": "testB"}], written out opcode by opcode.
PY2_PICKLE = (b"\x80\x02]q\x00}q\x01(U\x06ref_idq\x02K\x03U\x06ann_idq\x03KdU\x08image_idq\x04K7"
              b"U\x05splitq\x05U\x05testBq\x06ua.")


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # what a crafted refs file would carry
        return (open, (self.path, "w"))


def _write_refer(tmp_path, refs_bytes):
    (tmp_path / "refs(unc).p").write_bytes(refs_bytes)
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    return str(tmp_path / "refs(unc).p"), str(tmp_path / "instances.json")


@pytest.mark.slow
def test_refer_files_become_the_refs_file(tmp_path):
    refs, instances = _write_refer(tmp_path, pickle.dumps(REFS, protocol=2))
    out = tmp_path / "refs.json"
    result = subprocess.run([sys.executable, "-m", "albef.data.grounding", "--refs", refs, "--instances", instances,
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 references (testA 1, val 1)" in result.stdout
    assert json.loads(out.read_text()) == {
        "7": {"image_id": 55, "bbox": [1.0, 2.0, 30.0, 40.0], "split": "testA"},
        "9": {"image_id": 56, "bbox": [5.5, 6.0, 7.0, 8.0], "split": "val"}}
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps([{"image": "a.jpg", "text": "man left", "ref_id": 7}]))
    (ref,) = load_refs([str(evals)], str(out))
    assert ref["bbox"] == [1.0, 2.0, 30.0, 40.0] and ref["split"] == "testA" and ref["image_id"] == 55


def test_python2_refer_pickle_reads_as_text(tmp_path):
    refs, instances = _write_refer(tmp_path, PY2_PICKLE)
    assert read_refer_refs(refs) == [{"ref_id": 3, "ann_id": 100, "image_id": 55, "split": "testB"}]
    assert refer_refs_file(refs, instances) == {"3": {"image_id": 55, "bbox": [1.0, 2.0, 30.0, 40.0], "split": "testB"}}


@pytest.mark.slow
def test_a_crafted_refer_pickle_never_runs(tmp_path):
    marker = tmp_path / "ran"
    refs, instances = _write_refer(tmp_path, pickle.dumps([{"ref_id": 1, "x": _Marker(str(marker))}], protocol=2))
    with pytest.raises(AnnotationError, match="refusing 'io.open'"):
        read_refer_refs(refs)
    result = subprocess.run([sys.executable, "-m", "albef.data.grounding", "--refs", refs, "--instances", instances,
                             "--out", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "refs(unc).p" in result.stderr
    assert not marker.exists() and not (tmp_path / "o.json").exists()
    with open(refs, "rb") as fp:  # the payload is real: a plain pickle.load runs it
        pickle.load(fp)
    assert marker.exists()


def test_refer_reference_without_its_annotation_is_named(tmp_path):
    refs, instances = _write_refer(tmp_path, pickle.dumps([{**REFS[0], "ann_id": 999}], protocol=2))
    with pytest.raises(AnnotationError, match="reference 7 names annotation 999"):
        refer_refs_file(refs, instances)


# ----------------------------------------------------------------------------- gradcam_mode itc


def _itc_gradcam_by_hand(model, images, input_ids, attention_mask, block_num):
    """ALBEF's itc map written out: the ViT run block by block, block `block_num`'s attention
    probabilities computed from its weights and made a leaf, sim = i . t / temp, d(sum sim)/d(attn)."""
    from albef.gradcam import patch_grid

    vit = model.visual_encoder
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:block_num]:
            x = block(x)
    block, attn = vit.blocks[block_num], vit.blocks[block_num].attn
    h = block.norm1(x)
    batch, tokens, width = h.shape
    q, k, v = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).detach().requires_grad_(True)
    x = x + attn.proj((probs @ v).transpose(1, 2).reshape(batch, tokens, width))
    x = x + block.mlp(block.norm2(x))
    for later in vit.blocks[block_num + 1:]:
        x = later(x)
    image_feat = F.normalize(model.vision_proj(vit.norm(x)[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(model.text_encoder.bert(input_ids, attention_mask, mode="text")[:, 0]),
                            dim=-1)
    sim = (image_feat * text_feat).sum(-1) / model.temp
    (grad,) = torch.autograd.grad(sim.sum(), probs)
    prefix, (rows, cols) = patch_grid(vit)
    cam = probs.detach()[:, :, 0, prefix:] * grad[:, :, 0, prefix:].clamp(min=0)
    return cam.reshape(batch, -1, rows, cols).mean(dim=1), sim.detach()


import torch.nn.functional as F  # noqa: E402


@pytest.mark.parametrize("block_num", [0, 1])
def test_itc_gradcam_matches_hand_computation(tmp_path, block_num):
    from albef.gradcam import itc_gradcam
    from albef.build import build_model
    from conftest import tiny_config

    cfg = tiny_config(tmp_path)
    cfg.model.vision.depth = 2  # a block before and after the one read
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images, input_ids, attention_mask = make_batch(3)
    cams, sim = itc_gradcam(model, images, input_ids, attention_mask, block_num)
    want_cams, want_sim = _itc_gradcam_by_hand(model, images, input_ids, attention_mask, block_num)
    assert cams.shape == want_cams.shape and cams.abs().sum() > 0
    torch.testing.assert_close(sim, want_sim, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cams, want_cams, rtol=1e-4, atol=1e-9)
    assert all(block.attn.fused_attn == model.visual_encoder.blocks[0].attn.fused_attn
               for block in model.visual_encoder.blocks)  # restored
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(gradcam(model, images, input_ids, attention_mask, block_num, "itc"), cams)
    with pytest.raises(ValueError, match="is not a ViT block"):
        itc_gradcam(model, images, input_ids, attention_mask, len(model.visual_encoder.blocks))


@pytest.mark.slow
def test_itc_mode_evaluates_and_draws_from_the_cli(gset, tmp_path, capsys, monkeypatch):
    import albef.gradcam
    import albef.tasks.grounding as grounding

    calls = []
    stock = albef.gradcam.itc_gradcam

    def spy(*args):
        calls.append(args[-1])
        return stock(*args)

    monkeypatch.setattr(albef.gradcam, "itc_gradcam", spy)
    monkeypatch.setattr(grounding, "itc_gradcam", spy)
    run = tmp_path / "itc"
    assert main(_args(gset, run, "train.max_steps=1", "grounding.gradcam_mode=itc", "grounding.block_num=1")) == 0
    test = json.loads((run / "results" / "test_latest.json").read_text())
    assert set(test) >= {"testA_d", "testB_d"} and calls and set(calls) == {1}
    calls.clear()
    capsys.readouterr()
    assert main(_args(gset, run, "--visualize", "--init-from", str(run / "best.pt"), "grounding.gradcam_mode=itc",
                      "grounding.block_num=1", "grounding.visualize_count=1")) == 0
    assert calls == [1] and ".png" in capsys.readouterr().out
    assert len(list((run / "gradcam").glob("*.png"))) == 1
    assert main(_args(gset, tmp_path / "bad", "grounding.gradcam_mode=itc", "grounding.block_num=9")) == 2
    assert "grounding.block_num=9 is not a ViT block" in capsys.readouterr().err
