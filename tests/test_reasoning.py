"""SNLI-VE, NLVR2 and NLVR2 text assignment: models, ALBEF checkpoint compatibility and
initialisation rules (checked key by key against the original's rules), losses, data, and
short end-to-end runs through the engine and the CLIs."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef.checkpoint import read_model_state, resample_pos_embed, save_pretrained
from albef.config import Config
from albef.data.datasets import AnnotationError
from albef.data.reasoning import ReasoningDataset, load_nlvr_annotations, load_ve_annotations
from albef.data.synthetic import generate_reasoning_sets
from albef.data.transforms import eval_transform
from albef.engine.trainer import update_momentum
from albef.losses import classification_distill_loss
from albef.models import build_classifier, build_text_assignment
from albef.models.classify import assign_images, double_fusion_layers
from albef.tasks import nlvr, nlvr_pretrain, ve
from albef.tasks.nlvr import NLVRTask
from albef.tasks.nlvr_pretrain import TextAssignmentTask
from albef.tasks.ve import VETask
from conftest import TINY_YAML, tiny_corpus

torch.set_num_threads(2)


def _original_dir() -> Path:
    """../shared/albef_original of the repository, else $ALBEF_ORIGINAL_DIR."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "albef_original"
    return default if default.is_dir() else Path(os.environ.get("ALBEF_ORIGINAL_DIR", default))


DOWNSTREAM = _original_dir() / "downstream"
needs_original = pytest.mark.skipif(
    not (DOWNSTREAM / "tiny_pretrain_l12.pth").is_file(),
    reason=f"checkpoints written by the original ALBEF code not found in {DOWNSTREAM} "
    "(set ALBEF_ORIGINAL_DIR to the albef_original directory)")
BERT_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
FUSION = 6
POS_EMBEDS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bert_l12(tmp_path_factory):
    """The original's tiny 12-layer BERT config (fusion layer 6) with a bert-base-sized vocab."""
    path = tmp_path_factory.mktemp("bert_tiny_l12")
    (path / "config.json").write_text((DOWNSTREAM / "configs" / "config_bert_tiny_l12.json").read_text())
    (path / "vocab.txt").write_text("\n".join(BERT_SPECIAL.get(i, f"tok{i}") for i in range(30522)) + "\n")
    return path


def _config(bert_dir, image_size: int, distill: bool = True) -> Config:
    """Our config of the original's tiny models (ViT width 64, depth 2, patch 16)."""
    vit = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16, "mlp_ratio": 4.0, "pretrained": False}
    return Config.from_dict({"model": {
        "embed_dim": 32, "distill": distill, "vision": {"image_size": image_size, **vit},
        "text": {"bert": str(bert_dir), "pretrained": False, "fusion_layer": FUSION}}})


def _original(name: str) -> dict[str, torch.Tensor]:
    """The raw state dict of a checkpoint written by the original code (its own key names)."""
    state = torch.load(DOWNSTREAM / name, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def _ours(key: str) -> str:
    """ALBEF BertModel key -> ours (`text_encoder.encoder.x` -> `text_encoder.bert.encoder.x`)."""
    for prefix in ("text_encoder.", "text_encoder_m."):
        if key.startswith(prefix) and not key.startswith(prefix + "bert."):
            return prefix + "bert." + key[len(prefix):]
    return key


def _model(kind: str, bert_dir, image_size: int, distill: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _config(bert_dir, image_size, distill)
    if kind == "ta":
        return build_text_assignment(cfg.model)
    return build_classifier(cfg.model, 3, 1) if kind == "ve" else build_classifier(cfg.model, 2, 2)


def _shared_kv_pairs(model) -> list[tuple[str, str]]:
    keys = []
    for encoder in ("text_encoder", "text_encoder_m"):
        if hasattr(model, encoder):
            for first in range(FUSION, 18, 2):
                for part in ("key.weight", "key.bias", "value.weight", "value.bias"):
                    keys.append(tuple(f"{encoder}.bert.encoder.layer.{n}.crossattention.self.{part}"
                                      for n in (first, first + 1)))
    return keys


def _only_position_ids(unexpected: list[str]) -> bool:
    """The HF `position_ids` buffers of the original's BERT are the only keys left over."""
    return all(k.endswith("embeddings.position_ids") for k in unexpected)


def _assert_kv_shared(model) -> None:
    state = model.state_dict(keep_vars=True)
    pairs = _shared_kv_pairs(model)
    assert len(pairs) == 24 * (2 if hasattr(model, "text_encoder_m") else 1)
    for a, b in pairs:
        assert state[a] is state[b], a


# ----------------------------------------------------------------------------- losses and metrics


def test_distillation_loss_is_weighted_hard_and_soft_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    logits_m = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 1.5]])
    targets = torch.tensor([0, 1])
    alpha = 0.3

    def log_softmax(row):
        total = sum(math.exp(x) for x in row)
        return [x - math.log(total) for x in row]

    hard = soft = 0.0
    for row, row_m, y in zip(logits.tolist(), logits_m.tolist(), targets.tolist()):
        logp = log_softmax(row)
        q = [math.exp(x) for x in log_softmax(row_m)]
        hard += -logp[y] / 2
        soft += -sum(qi * li for qi, li in zip(q, logp)) / 2
    expected = (1 - alpha) * hard + alpha * soft
    assert classification_distill_loss(logits, targets, logits_m, alpha).item() == pytest.approx(expected, rel=1e-6)
    assert classification_distill_loss(logits, targets).item() == pytest.approx(hard, rel=1e-6)
    assert classification_distill_loss(logits, targets, logits_m, 0.0).item() == pytest.approx(hard, rel=1e-6)


def test_ta_assignment_draws_consistent_pairs():
    torch.manual_seed(0)
    batch = 64
    weights = torch.rand(batch, batch).fill_diagonal_(0)
    image0, image1, labels = assign_images(weights)
    own = torch.arange(batch)
    assert torch.equal(image0[labels == 0], own[labels == 0])
    assert torch.equal(image1[labels == 1], own[labels == 1])
    neither = labels == 2
    assert (image0[neither] != own[neither]).all() and (image1[neither] != own[neither]).all()
    assert (image0 != image1).all()
    counts = torch.bincount(assign_images(torch.ones(3000, 3000).fill_diagonal_(0))[2], minlength=3)
    assert torch.allclose(counts / 3000.0, torch.tensor([1 / 3, 1 / 3, 1 / 3]), atol=0.04)


# ----------------------------------------------------------------------------- two-image fusion


@pytest.mark.slow
@needs_original
def test_nlvr_fusion_layers_alternate_between_the_two_images(bert_l12):
    model = _model("nlvr", bert_l12, 96).eval()
    bert = model.text_encoder.bert
    assert len(bert.encoder.layer) == 18
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(2, 37, 64, generator=gen) for _ in range(2)]
    ids = torch.randint(1000, 2000, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        got = bert(ids, mask, images, mode="multimodal")
        hidden = bert.embeddings(ids)
        key_mask = mask.bool()[:, None, None, :]
        for i, layer in enumerate(bert.encoder.layer):
            hidden, _ = layer(hidden, key_mask, images[(i - FUSION) % 2] if i >= FUSION else None, None)
        assert torch.allclose(got, hidden, atol=1e-5)
        swapped = bert(ids, mask, images[::-1], mode="multimodal")
    assert not torch.allclose(got, swapped, atol=1e-3)


@needs_original
def test_shared_key_value_stay_shared_through_the_momentum_update(bert_l12):
    model = _model("nlvr", bert_l12, 96)
    _assert_kv_shared(model)
    for p in model.text_encoder.parameters():
        p.data.add_(1.0)
    model.momentum_update()
    _assert_kv_shared(model)
    layers = model.text_encoder_m.bert.encoder.layer
    assert torch.equal(layers[6].crossattention.self.key.weight, layers[7].crossattention.self.key.weight)


# ----------------------------------------------------------------------------- released checkpoints


@needs_original
@pytest.mark.parametrize("kind, name, image_size, task", [
    ("ve", "tiny_ve.pth", 96, VETask), ("ta", "tiny_nlvr_ta.pth", 64, TextAssignmentTask),
    ("nlvr", "tiny_nlvr.pth", 96, NLVRTask)])
def test_original_finetuned_checkpoints_load_completely(bert_l12, kind, name, image_size, task):
    model = _model(kind, bert_l12, image_size)
    path = DOWNSTREAM / name
    report = task().init_weights(model, read_model_state(path), str(path))
    assert not (report.missing or report.skipped or report.new or report.resampled)
    assert _only_position_ids(report.unexpected)
    original = _original(name)
    ours = model.state_dict()
    assert {_ours(k) for k in original} == set(ours)
    for key, value in original.items():
        assert torch.equal(ours[_ours(key)], value), key
    if kind != "ve":
        _assert_kv_shared(model)


# ----------------------------------------------------------------------------- initialisation rules


def _ta_rule_targets(pretrain_key: str) -> list[str]:
    """Pretrain_nlvr.py's remap of one ALBEF pretraining key, written out as the original does."""
    if "bert" not in pretrain_key:
        return [pretrain_key]
    new_key = pretrain_key.replace("bert.", "")
    if "layer" not in new_key:
        return [new_key]
    keys = new_key.split(".")
    n = int(keys[3])
    if n < 6:
        return [new_key]
    return [".".join(keys[:3] + [str(2 * (n - 6) + 6 + j)] + keys[4:]) for j in (0, 1)]


@needs_original
def test_ve_from_pretrain_copies_the_original_rule(bert_l12):
    model = _model("ve", bert_l12, 96)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cls_head.")}
    path = DOWNSTREAM / "tiny_pretrain_l12.pth"
    report = VETask().init_weights(model, read_model_state(path), str(path))
    assert sorted(report.resampled) == sorted(POS_EMBEDS)
    assert report.new == sorted(k for k in model.state_dict() if k.startswith(("cls_head.", "cls_head_m.")))
    assert not report.missing and _only_position_ids(report.unexpected)
    ours = model.state_dict()
    pretrain = _original("tiny_pretrain_l12.pth")
    mapped = 0
    for key, value in pretrain.items():  # VE.py: strip 'bert.'; the rest keeps its name
        target = key.replace("bert.", "") if "bert" in key else key
        if _ours(target) not in ours:
            continue
        expected = resample_pos_embed(value, (6, 6), 1) if target in POS_EMBEDS else value
        assert torch.equal(ours[_ours(target)], expected), target
        mapped += 1
    assert mapped == 574  # as the original: ViTs, text encoders (momentum included)
    for key, value in fresh_head.items():
        assert torch.equal(ours[key], value) and torch.equal(ours[key.replace("cls_head.", "cls_head_m.")], value)
    unused = set(pretrain) - {k for k in pretrain if _ours(k.replace("bert.", "") if "bert" in k else k) in ours}
    assert all(k.startswith(("text_encoder.cls.", "text_encoder_m.cls.", "vision_proj", "text_proj", "itm_head"))
               or k in ("temp", "image_queue", "text_queue", "idx_queue", "queue_ptr") for k in unused)


@needs_original
def test_ta_from_pretrain_doubles_the_fusion_layers_as_the_original(bert_l12):
    model = _model("ta", bert_l12, 64)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("ta_head.")}
    path = DOWNSTREAM / "tiny_pretrain_l12.pth"
    report = TextAssignmentTask().init_weights(model, read_model_state(path), str(path))
    assert report.new == ["ta_head.bias", "ta_head.weight"]
    assert not (report.missing or report.resampled) and _only_position_ids(report.unexpected)
    ours = model.state_dict()
    covered = set()
    for key, value in _original("tiny_pretrain_l12.pth").items():
        for target in _ta_rule_targets(key):
            if _ours(target) in ours:
                assert torch.equal(ours[_ours(target)], value), f"{target} <- {key}"
                covered.add(_ours(target))
    assert len(covered) == 448 and covered  # the original's 449 count its position_ids buffer == set(ours) - set(fresh_head)
    for key, value in fresh_head.items():
        assert torch.equal(ours[key], value)
    _assert_kv_shared(model)


@needs_original
def test_nlvr_from_ta_loads_the_student_and_starts_momentum_from_it(bert_l12):
    model = _model("nlvr", bert_l12, 96)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cls_head.")}
    path = DOWNSTREAM / "tiny_nlvr_ta.pth"
    report = NLVRTask().init_weights(model, read_model_state(path), str(path))
    assert sorted(report.resampled) == sorted(POS_EMBEDS)
    assert not report.missing and _only_position_ids(report.unexpected)
    assert sorted(report.skipped) == ["ta_head.bias", "ta_head.weight", "temp", "text_proj.bias", "text_proj.weight",
                                      "vision_proj.bias", "vision_proj.weight"]
    ours = model.state_dict()
    ta = _original("tiny_nlvr_ta.pth")
    student = 0
    for key, value in ta.items():  # NLVR.py: no renaming
        if _ours(key) not in ours:
            continue
        expected = resample_pos_embed(value, (6, 6), 1) if key in POS_EMBEDS else value
        assert torch.equal(ours[_ours(key)], expected), key
        # the sensible fix of NLVR.py: momentum encoders start from the loaded weights
        momentum = _ours(key).replace("visual_encoder.", "visual_encoder_m.").replace("text_encoder.", "text_encoder_m.")
        assert torch.equal(ours[momentum], expected), momentum
        student += 1
    assert student == 443
    for key, value in fresh_head.items():
        assert torch.equal(ours[key], value) and torch.equal(ours[key.replace("cls_head.", "cls_head_m.")], value)
    _assert_kv_shared(model)


@needs_original
def test_nlvr_from_pretrain_equals_nlvr_from_a_zero_step_ta_checkpoint(bert_l12, tmp_path):
    pretrain = DOWNSTREAM / "tiny_pretrain_l12.pth"
    ta = _model("ta", bert_l12, 64)
    TextAssignmentTask().init_weights(ta, read_model_state(pretrain), str(pretrain))
    ta_file = save_pretrained(ta, tmp_path / "ta.pt")
    via_ta, direct = _model("nlvr", bert_l12, 96), _model("nlvr", bert_l12, 96)
    NLVRTask().init_weights(via_ta, read_model_state(ta_file), str(ta_file))
    report = NLVRTask().init_weights(direct, read_model_state(pretrain), str(pretrain))
    assert not report.missing and _only_position_ids(report.unexpected)
    notes = " ".join(report.notes)
    assert "6->6,7, 7->8,9, 8->10,11, 9->12,13, 10->14,15, 11->16,17" in notes
    assert "text_encoder_m.* <- text_encoder.*" in notes
    a, b = via_ta.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    _assert_kv_shared(direct)


def test_double_fusion_layers_is_a_pure_key_rule():
    t = [torch.tensor(float(i)) for i in range(5)]
    state = {"text_encoder.bert.encoder.layer.1.x": t[0], "text_encoder.bert.encoder.layer.2.y": t[1],
             "text_encoder_m.bert.encoder.layer.3.z": t[2], "text_encoder.bert.embeddings.w": t[3],
             "visual_encoder.blocks.3.q": t[4]}
    out = double_fusion_layers(state, fusion_layer=2)
    assert out == {"text_encoder.bert.encoder.layer.1.x": t[0], "text_encoder.bert.encoder.layer.2.y": t[1],
                   "text_encoder.bert.encoder.layer.3.y": t[1], "text_encoder_m.bert.encoder.layer.4.z": t[2],
                   "text_encoder_m.bert.encoder.layer.5.z": t[2], "text_encoder.bert.embeddings.w": t[3],
                   "visual_encoder.blocks.3.q": t[4]}


# ----------------------------------------------------------------------------- forward on original weights


@needs_original
def test_nlvr_forward_on_original_weights_uses_the_momentum_model_for_targets(bert_l12):
    model = _model("nlvr", bert_l12, 96)
    path = DOWNSTREAM / "tiny_nlvr.pth"
    NLVRTask().init_weights(model, read_model_state(path), str(path))
    model.eval()
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(3, 2, 3, 96, 96, generator=gen)
    ids = torch.randint(1000, 2000, (3, 6), generator=gen)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    targets = torch.tensor([0, 1, 1])
    with torch.no_grad():
        logits = model(images, ids, mask)
        # by hand: one ViT per image, text layers, then fusion layers alternating image 0 / 1
        embeds = [model.visual_encoder(images[:, j]) for j in range(2)]
        hidden = model.text_encoder.bert(ids, mask, embeds, mode="multimodal")
        assert torch.allclose(logits, model.cls_head(hidden[:, 0]), atol=1e-5)
        embeds_m = [model.visual_encoder_m(images[:, j]) for j in range(2)]
        hidden_m = model.text_encoder_m.bert(ids, mask, embeds_m, mode="multimodal")
        logits_m = model.cls_head_m(hidden_m[:, 0])
        assert not torch.allclose(logits, logits_m, atol=1e-4)  # the file's momentum model differs
        out = model(images, ids, mask, targets=targets, alpha=0.4)
    expected = 0.6 * F.cross_entropy(logits, targets) - 0.4 * (
        F.log_softmax(logits, 1) * F.softmax(logits_m, 1)).sum(1).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@needs_original
def test_ve_momentum_model_moves_only_by_the_engines_ema(bert_l12):
    """The EMA is the engine's (once per optimizer step, before its first forward:
    tests/test_momentum_timing.py); the VE step itself leaves the momentum model alone."""
    model = _model("ve", bert_l12, 96)
    path = DOWNSTREAM / "tiny_ve.pth"
    VETask().init_weights(model, read_model_state(path), str(path))
    student = model.cls_head[2].weight.detach().clone()
    before = model.cls_head_m[2].weight.detach().clone()
    task = VETask()
    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(2, 3, 96, 96, generator=gen), "input_ids": torch.randint(1000, 2000, (2, 5)),
             "attention_mask": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([2, 0])}
    update_momentum(model)  # what the engine runs before the step's first forward
    task.forward_step(model, batch, alpha=0.4)
    task.forward_step(model, batch, alpha=0.4)  # a second micro-batch of the same step: no second EMA
    expected = before * 0.995 + student * 0.005
    assert torch.allclose(model.cls_head_m[2].weight, expected, atol=1e-7)
    task.after_optimizer_step(model, [])
    update_momentum(model)
    task.forward_step(model, batch, alpha=0.4)
    assert torch.allclose(model.cls_head_m[2].weight, expected * 0.995 + student * 0.005, atol=1e-7)


# ----------------------------------------------------------------------------- data


def test_annotation_formats_and_one_line_errors(tmp_path):
    ve_file = tmp_path / "ve.json"
    ve_file.write_text(json.dumps([{"image": "123", "sentence": "A dog.", "label": "entailment"},
                                   {"image": "a/b.png", "sentence": "x", "label": "contradiction"},
                                   {"image": "c", "sentence": "y", "label": "neutral"}]))
    got = load_ve_annotations([str(ve_file)])
    assert [g["images"] for g in got] == [["123.jpg"], ["a/b.png"], ["c.jpg"]]
    assert [g["label"] for g in got] == [2, 0, 1]  # ALBEF's ids
    nlvr_file = tmp_path / "nlvr.json"
    nlvr_file.write_text(json.dumps([{"images": ["a.png", "b.png"], "sentence": "s", "label": True},
                                     {"images": ["a.png", "b.png"], "sentence": "s", "label": "False"}]))
    assert [g["label"] for g in load_nlvr_annotations([str(nlvr_file)])] == [1, 0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"images": ["a.png", "b.png"], "sentence": "s", "label": 1}]))
    with pytest.raises(AnnotationError, match=r"bad.json: entry 0: 'label' must be true or false"):
        load_nlvr_annotations([str(bad)])
    bad.write_text(json.dumps([{"image": "a", "sentence": "s", "label": "yes"}]))
    with pytest.raises(AnnotationError, match=r"entry 0: 'label' must be one of contradiction, neutral, entailment"):
        load_ve_annotations(str(bad))


def test_demo_sets_say_what_is_drawn(tmp_path):
    paths = generate_reasoning_sets(str(tmp_path), num_train=40, num_val=4, num_test=4, image_size=32)
    ve_entries = json.loads(Path(paths["ve_train"]).read_text())
    nlvr_entries = json.loads(Path(paths["nlvr_train"]).read_text())
    assert {e["label"] for e in ve_entries} == {"entailment", "contradiction"}
    assert {e["label"] for e in nlvr_entries} == {True, False}
    dataset = ReasoningDataset("nlvr", paths["nlvr_train"], paths["image_root"], eval_transform(32, [0.5] * 3, [0.5] * 3))
    sample = dataset[0]
    assert sample["image"].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------- end to end


def _tiny_overrides(tmp_path, sets, task: str, corpus) -> list[str]:
    return [
        f"output_dir={tmp_path / task}", f"data.train_files=[{sets[f'{task}_train']}]",
        f"data.image_root={sets['image_root']}", f"eval.val_files=[{sets[f'{task}_val']}]",
        f"eval.test_files=[{sets[f'{task}_test']}]", f"eval.image_root={sets['image_root']}",
        f"model.text.bert={corpus['bert']}", "train.max_steps=3", "train.batch_size=4", "eval.batch_size=5",
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), num_train=12)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return generate_reasoning_sets(str(tmp_path_factory.mktemp("reasoning")), num_train=12, num_val=7, num_test=6,
                                   image_size=32)


def _check_accuracy(run: Path, split: str, result: dict) -> None:
    rows = [json.loads(line) for line in (run / "predictions" / f"{split}.jsonl").read_text().splitlines()]
    correct = sum(row["prediction"] == row["label"] for row in rows)
    assert result["acc"] == pytest.approx(100.0 * correct / len(rows))
    assert result["num_samples"] == len(rows)


@pytest.mark.parametrize("task", ["ve", "nlvr"])
@pytest.mark.slow
def test_task_trains_and_its_accuracy_is_the_brute_force_one(tmp_path, corpus, sets, task, capsys):
    main = ve.main if task == "ve" else nlvr.main
    assert main(["--config", str(TINY_YAML), *_tiny_overrides(tmp_path, sets, task, corpus)]) == 0
    run = tmp_path / task
    assert (run / "best.pt").is_file()
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("loss_cls" in row for row in logged)
    results = sorted((run / "results").glob("*.json"))
    by_split = {p.name.split("_")[0]: json.loads(p.read_text()) for p in results}
    assert set(by_split) >= {"val", "test"}
    _check_accuracy(run, "test", by_split["test"])
    # --evaluate on the run's best.pt reproduces the test accuracy
    assert main(["--config", str(TINY_YAML), "--evaluate", *_tiny_overrides(tmp_path, sets, task, corpus)]) == 0
    _check_accuracy(run, "test", by_split["test"])


@pytest.mark.slow
def test_text_assignment_then_nlvr_from_its_run(tmp_path, corpus, sets):
    captions = [f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
                f"model.text.bert={corpus['bert']}", "train.max_steps=2", "train.batch_size=4",
                f"eval.val_files=[{corpus['train']}]", f"eval.image_root={corpus['image_root']}", "eval.batch_size=6"]
    ta_run = tmp_path / "ta"
    assert nlvr_pretrain.main(["--config", str(TINY_YAML), f"output_dir={ta_run}", *captions]) == 0
    logged = [json.loads(line) for line in (ta_run / "log.jsonl").read_text().splitlines()]
    assert any("loss_ta" in row for row in logged)
    overrides = _tiny_overrides(tmp_path, sets, "nlvr", corpus) + ["train.max_steps=1"]
    assert nlvr.main(["--config", str(TINY_YAML), "--init-from", str(ta_run), *overrides]) == 0


@pytest.mark.slow
def test_bad_annotation_is_one_line_exit_2(tmp_path, corpus, sets, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.jpg", "sentence": "s", "label": "maybe"}]))
    overrides = _tiny_overrides(tmp_path, sets, "ve", corpus) + [f"data.train_files=[{bad}]"]
    assert ve.main(["--config", str(TINY_YAML), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json: entry 0: 'label' must be one of" in err[0]
    assert nlvr.main(["--config", str(TINY_YAML), "train.strategy=fsdp", *_tiny_overrides(tmp_path, sets, "nlvr", corpus)]) == 2
    assert "share their cross-attention key/value" in capsys.readouterr().err
    assert nlvr_pretrain.main(["--config", str(TINY_YAML), "train.batch_size=2",
                               f"data.train_files=[{corpus['train']}]", f"model.text.bert={corpus['bert']}"]) == 2
