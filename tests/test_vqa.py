"""VQA: answer weights (the VQA accuracy: tests/test_metrics.py), the answer loss, answer ranking, the decoder's causal
mask, loading released ALBEF VQA checkpoints and the decoder initialisation from pretraining."""
import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from albef.checkpoint import load_checkpoint_file, load_pretrained, map_albef_keys, match_state_dict
from albef.config import VisionConfig
from albef.data.vqa import answer_weights, pre_question
from albef.losses import answer_sequence_loss
from albef.models.bert import TextEncoder
from albef.models.vision import build_vision_encoder
from albef.models.vqa import (UNUSED_FROM_PRETRAIN, AnswerDecoder, VQAModel, decoder_config,
                              init_from_pretrain_state)

torch.set_num_threads(2)


def _shared_dir() -> Path:
    """../shared/albef_original next to the repo, or $ALBEF_ORIGINAL_DIR (git worktrees)."""
    here = Path(__file__).resolve().parents[1].parent / "shared" / "albef_original"
    return here if here.is_dir() else Path(os.environ.get("ALBEF_ORIGINAL_DIR", here))


SHARED = _shared_dir()
DOWNSTREAM = SHARED / "downstream"
needs_original = pytest.mark.skipif(
    not (DOWNSTREAM / "tiny_vqa.pth").is_file(),
    reason=f"checkpoints written by the original ALBEF code not found in {DOWNSTREAM} "
    "(set ALBEF_ORIGINAL_DIR to the albef_original directory)")
POS_EMBEDS = ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]


# ----------------------------------------------------------------------------- data, metric, loss


def test_answer_weights_follow_albef():
    entry = {"answer": ["yes", "yes", "no", "yes", "maybe"], "dataset": "vqa"}
    assert answer_weights(entry) == (["yes", "no", "maybe"], [0.6, 0.2, 0.2])
    assert answer_weights({"answer": ["left"], "dataset": "vg"}) == (["left"], [0.5])
    assert answer_weights({"answer": "left", "dataset": "vg"}, vg_weight=0.3) == (["left"], [0.3])


def test_pre_question_cleans_like_albef():
    assert pre_question("What's the man-made thing/object?", 30) == "whats the man made thing object"
    assert pre_question("a b c d", 2) == "a b"


def test_answer_loss_is_summed_token_cross_entropy_with_distillation():
    gen = torch.Generator().manual_seed(0)
    logits, soft = torch.randn(3, 4, 11, generator=gen), torch.randn(3, 4, 11, generator=gen).softmax(-1)
    targets = torch.randint(0, 11, (3, 4), generator=gen)
    targets[0, 2:] = -100
    targets[2, 3] = -100
    loss = answer_sequence_loss(logits, targets, soft, alpha=0.3)
    for n in range(3):
        ce = distill = 0.0
        for t in range(4):
            if targets[n, t] == -100:
                continue
            log_p = logits[n, t].log_softmax(-1)
            ce += -log_p[targets[n, t]]
            distill += -(soft[n, t] * log_p).sum()
        assert loss[n] == pytest.approx(float(0.7 * ce + 0.3 * distill), rel=1e-5)
    ce_only = answer_sequence_loss(logits, targets)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 4).sum(1)
    torch.testing.assert_close(ce_only, ref)


# ----------------------------------------------------------------------------- a tiny model


def tiny_vqa_model(bert_config: BertConfig, image_size: int = 32, vision_width: int = 32, distill: bool = True,
                   seed: int = 0, **vision) -> VQAModel:
    torch.manual_seed(seed)
    vcfg = VisionConfig(arch="vit_base_patch16_224", pretrained=False, image_size=image_size, embed_dim=vision_width,
                        depth=vision.get("depth", 1), num_heads=vision.get("num_heads", 2),
                        patch_size=vision.get("patch_size", 8), mlp_ratio=vision.get("mlp_ratio", 2.0))
    bert_config.encoder_width = vision_width
    encoder = TextEncoder(bert_config, mlm_head=False)
    return VQAModel(build_vision_encoder(vcfg), encoder, AnswerDecoder(decoder_config(bert_config)),
                    pad_token_id=0, distill=distill)


def small_bert() -> BertConfig:
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config.fusion_layer = 2
    return config


CLS, SEP = 2, 3
ANSWERS = [[7], [8, 9], [10], [11, 12, 13], [14]]  # token ids of 5 candidate answers


def answer_list_tensors(answers=ANSWERS):
    """Tokenised answer list as ALBEF builds it: [CLS] answer [SEP] [SEP] (eos + sep), right-padded."""
    rows = [[CLS, *a, SEP, SEP] for a in answers]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, (ids != 0).long()


def question_batch(batch_size=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=gen)
    ids = torch.randint(15, 40, (batch_size, 6), generator=gen)
    ids[:, 0] = CLS
    ids[0, 5], ids[1, 3], ids[1, 4:], ids[2, 5] = SEP, SEP, 0, SEP
    return images, ids, (ids != 0).long()


def sequence_log_likelihood(model, states, mask, answer):
    """Brute force: log p(answer tokens, [SEP], [SEP] | [CLS], question) token by token, unpadded."""
    seq = [CLS, *answer, SEP, SEP]
    total = 0.0
    for t in range(1, len(seq)):
        logits = model.text_decoder(torch.tensor([seq[:t]]), None, states, mask)[0, -1]
        total += float(logits.log_softmax(-1)[seq[t]])
    return total


def test_decoder_is_causal_and_ignores_padding():
    model = tiny_vqa_model(small_bert(), distill=False).eval()
    images, q_ids, q_mask = (t[:1] for t in question_batch(3))
    states = model.encode_question(images, q_ids, q_mask)
    ids = torch.tensor([[CLS, 11, 12, 13, SEP]])
    full = model.text_decoder(ids, None, states, q_mask)
    changed = ids.clone()
    changed[0, 3:] = torch.tensor([20, 21])
    other = model.text_decoder(changed, None, states, q_mask)
    torch.testing.assert_close(full[:, :3], other[:, :3])  # no position sees a later token
    assert not torch.allclose(full[:, 3:], other[:, 3:])
    padded = model.text_decoder(torch.tensor([[CLS, 11, 12, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]), states, q_mask)
    torch.testing.assert_close(padded[:, :3], full[:, :3])


@pytest.mark.slow
@pytest.mark.parametrize("twice", [True, False])
def test_ranking_with_k_equal_to_the_list_is_full_sequence_scoring(twice):
    model = tiny_vqa_model(small_bert(), distill=False).eval()
    images, q_ids, q_mask = question_batch(3)
    ans_ids, ans_mask = answer_list_tensors()
    with torch.no_grad():
        states = model.encode_question(images, q_ids, q_mask)
        ranked, probs = model.rank_answers(states, q_mask, ans_ids, ans_mask, k=len(ANSWERS),
                                           count_first_token_twice=twice)
        for q in range(3):
            scores = []
            for answer in ANSWERS:
                ll = sequence_log_likelihood(model, states[q:q + 1], q_mask[q:q + 1], answer)
                if twice:  # ALBEF adds the first token's log-probability once more
                    first = model.text_decoder(torch.tensor([[CLS]]), None, states[q:q + 1], q_mask[q:q + 1])
                    ll += float(first[0, 0].log_softmax(-1)[answer[0]])
                scores.append(ll)
            expected = torch.tensor(scores).softmax(0)
            order = expected.argsort(descending=True)
            assert ranked[q].tolist() == order.tolist()
            torch.testing.assert_close(probs[q], expected[order], rtol=1e-4, atol=1e-6)


def test_ranking_returns_the_answer_a_rigged_decoder_prefers():
    model = tiny_vqa_model(small_bert(), distill=False).eval()
    head = model.text_decoder.cls.predictions
    with torch.no_grad():  # logits = bias at every position, whatever the input
        head.transform.dense.weight.zero_()
        head.transform.dense.bias.zero_()
        head.transform.LayerNorm.bias.zero_()
        head.bias.zero_()
        head.bias[[11, 12, 13]] = 6.0  # answer 3 = tokens 11 12 13
        head.bias[SEP] = 4.0
        head.bias[8] = 5.0  # a decoy first token (answer 1 = 8 9), whose second token is unlikely
    images, q_ids, q_mask = question_batch(3)
    ans_ids, ans_mask = answer_list_tensors()
    with torch.no_grad():
        states = model.encode_question(images, q_ids, q_mask)
        for k in (2, 3, 5):
            ranked, probs = model.rank_answers(states, q_mask, ans_ids, ans_mask, k=k)
            assert ranked.shape == probs.shape == (3, k)
            assert (ranked[:, 0] == 3).all()
            assert (probs[:, :-1] >= probs[:, 1:]).all()
        ranked, _ = model.rank_answers(states, q_mask, ans_ids, ans_mask, k=1)  # first token only
        assert (ranked[:, 0] == 3).all()


@pytest.mark.slow
def test_training_loss_weights_answers_and_learns():
    model = tiny_vqa_model(small_bert(), distill=True)
    images, q_ids, q_mask = question_batch(3)
    ans_ids, ans_mask = answer_list_tensors()
    rows = torch.tensor([0, 1, 3, 2, 4])  # question 0: answers 0, 1; question 1: answer 3; question 2: 2, 4
    per_q = torch.tensor([2, 1, 2])
    weights = torch.tensor([0.7, 0.3, 1.0, 0.5, 0.5])
    out = model(images, q_ids, q_mask, ans_ids[rows], ans_mask[rows], weights, per_q, alpha=0.0)
    # reference: each answer's summed token loss with its question, weighted, summed, / batch
    with torch.no_grad():
        states = model.encode_question(images, q_ids, q_mask)
        expected = 0.0
        for a, (row, q) in enumerate(zip(rows.tolist(), [0, 0, 1, 2, 2])):
            ll = sequence_log_likelihood(model, states[q:q + 1], q_mask[q:q + 1], ANSWERS[row])
            expected += -float(weights[a]) * ll
    assert float(out["loss"].detach()) == pytest.approx(expected / 3, rel=1e-4)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    momentum_before = model.text_decoder_m.cls.predictions.bias.clone()
    losses = []
    for _ in range(5):
        out = model(images, q_ids, q_mask, ans_ids[rows], ans_mask[rows], weights, per_q, alpha=0.4)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        model.momentum_update()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.text_decoder_m.cls.predictions.bias, momentum_before)
    assert all(not p.requires_grad for p in model.text_decoder_m.parameters())


# ----------------------------------------------------------------------------- original checkpoints


def tiny_l12_bert() -> BertConfig:
    config = BertConfig(**json.loads((DOWNSTREAM / "configs" / "config_bert_tiny_l12.json").read_text()))
    config.fusion_layer = 6
    return config


def tiny_original_model(image_size=96, seed=0) -> VQAModel:
    """Our VQA model at the size of the original tiny VQA fixture (ViT 64 wide, 2 blocks)."""
    return tiny_vqa_model(tiny_l12_bert(), image_size=image_size, vision_width=64, seed=seed, depth=2,
                          num_heads=4, patch_size=16, mlp_ratio=4.0)


@needs_original
def test_tiny_original_vqa_checkpoint_loads_exactly():
    model = tiny_original_model()
    path = DOWNSTREAM / "tiny_vqa.pth"
    report = load_pretrained(model, path)
    assert all(k.endswith("embeddings.position_ids") for k in report.unexpected) and len(report.unexpected) == 4
    assert not (report.missing or report.resampled or report.reinitialised or report.skipped)
    original = map_albef_keys(load_checkpoint_file(path)["model"])
    ours = model.state_dict()
    assert set(ours) == set(original) - set(report.unexpected)
    for key, value in ours.items():
        assert torch.equal(value, original[key]), key
    for decoder in (model.text_decoder, model.text_decoder_m):  # tied groups stay tied
        head = decoder.cls.predictions
        assert head.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
        assert head.decoder.bias is head.bias
    assert len(model.text_decoder.bert.encoder.layer) == 6
    assert all(layer.crossattention is not None for layer in model.text_decoder.bert.encoder.layer)


def original_vqa_from_pretrain_rule(state: dict) -> dict:
    """VQA.py:162-181 (not --evaluate), transcribed on the ORIGINAL key names."""
    state = dict(state)
    for key in list(state.keys()):
        if "bert" in key:
            state[key.replace("bert.", "")] = state[key]
        if "text_encoder" in key:
            if "layer" in key:
                parts = key.split(".")
                layer = int(parts[4])
                if layer < 6:
                    del state[key]
                    continue
                parts[4] = str(layer - 6)
                encoder_key = ".".join(parts)
            else:
                encoder_key = key
            state[encoder_key.replace("text_encoder", "text_decoder")] = state[key]
            del state[key]
    return state


@needs_original
def test_decoder_init_from_pretraining_copies_the_original_rule_tensors():
    from albef.checkpoint import read_model_state
    from albef.tasks.vqa import VQATask

    path = DOWNSTREAM / "tiny_pretrain_l12.pth"
    pretrain = load_checkpoint_file(path)["model"]
    model = tiny_original_model(seed=3)
    report = VQATask().init_weights(model, read_model_state(path), str(path))  # what --init-from runs
    assert report.resampled == POS_EMBEDS
    assert not (report.missing or report.reinitialised)
    assert all(k.endswith("position_ids") for k in report.unexpected)
    unused = sorted(k for k in pretrain if k.split(".")[0] in UNUSED_FROM_PRETRAIN)
    assert sorted(report.skipped) == unused

    # 1. the original's rule, keys mapped to ours afterwards: same tensors under the same names
    reference = map_albef_keys(original_vqa_from_pretrain_rule(pretrain))
    ours = model.state_dict()
    checked = 0
    for key, value in ours.items():
        if key in POS_EMBEDS:
            continue
        assert torch.equal(value, reference[key]), key
        checked += 1
    assert checked == len(ours) - 2

    # 2. every decoder key against its source, by the rule of downstream/README.md
    decoder_keys = [k for k in ours if k.startswith(("text_decoder.", "text_decoder_m."))]
    assert len(decoder_keys) == 2 * 169 - 2  # the manifest's 169 per decoder, less position_ids
    for key in decoder_keys:
        momentum, rest = key.split(".", 1)
        source_prefix = momentum.replace("text_decoder", "text_encoder")
        if rest.startswith("bert.encoder.layer."):
            parts = rest.split(".")
            parts[3] = str(int(parts[3]) + 6)
            source = f"{source_prefix}.{'.'.join(parts)}"
        else:  # bert.embeddings.*, cls.*
            source = f"{source_prefix}.{rest}"
        assert torch.equal(ours[key], pretrain[source]), (key, source)
    for key in ours:  # the question encoder keeps all 12 pretrained layers
        if key.startswith(("text_encoder.", "text_encoder_m.")):
            assert torch.equal(ours[key], pretrain[key]), key
    assert not any(k.startswith("text_encoder.cls") for k in ours)
    decoder = model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    for key in POS_EMBEDS:
        assert ours[key].shape == (1, 37, 64)
        assert torch.equal(ours[key][:, 0], pretrain[key][:, 0])


def test_init_from_pretrain_state_is_pure_and_maps_generic_depths():
    state = {
        "text_encoder.bert.encoder.layer.0.attention.self.query.weight": torch.tensor(0.0),
        "text_encoder.bert.encoder.layer.2.attention.self.query.weight": torch.tensor(2.0),
        "text_encoder.bert.encoder.layer.3.crossattention.self.key.bias": torch.tensor(3.0),
        "text_encoder.bert.embeddings.word_embeddings.weight": torch.tensor(4.0),
        "text_encoder.cls.predictions.bias": torch.tensor(5.0),
        "visual_encoder.cls_token": torch.tensor(6.0),
    }
    before = dict(state)
    mapped = init_from_pretrain_state(state, fusion_layer=2)
    assert state == before
    assert mapped == {
        "text_encoder.bert.encoder.layer.0.attention.self.query.weight": state[
            "text_encoder.bert.encoder.layer.0.attention.self.query.weight"],
        "text_encoder.bert.encoder.layer.2.attention.self.query.weight": state[
            "text_encoder.bert.encoder.layer.2.attention.self.query.weight"],
        "text_decoder.bert.encoder.layer.0.attention.self.query.weight": state[
            "text_encoder.bert.encoder.layer.2.attention.self.query.weight"],
        "text_encoder.bert.encoder.layer.3.crossattention.self.key.bias": state[
            "text_encoder.bert.encoder.layer.3.crossattention.self.key.bias"],
        "text_decoder.bert.encoder.layer.1.crossattention.self.key.bias": state[
            "text_encoder.bert.encoder.layer.3.crossattention.self.key.bias"],
        "text_encoder.bert.embeddings.word_embeddings.weight": state[
            "text_encoder.bert.embeddings.word_embeddings.weight"],
        "text_decoder.bert.embeddings.word_embeddings.weight": state[
            "text_encoder.bert.embeddings.word_embeddings.weight"],
        "text_decoder.cls.predictions.bias": state["text_encoder.cls.predictions.bias"],
        "visual_encoder.cls_token": state["visual_encoder.cls_token"],
    }


@needs_original
def test_full_size_vqa_manifest_maps_onto_our_keys():
    spec = json.loads((SHARED / "albef_vqa_keys.json").read_text())
    manifest = {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta") for k, v in spec.items()}
    config = tiny_l12_bert()
    config.update(dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, max_position_embeddings=512))
    with torch.device("meta"):
        model = tiny_vqa_model(config, image_size=384, vision_width=768, depth=12, num_heads=12, patch_size=16,
                               mlp_ratio=4.0)
    target = model.state_dict()
    mapped = map_albef_keys(manifest)
    final, report = match_state_dict(mapped, target)
    assert sorted(report.unexpected) == sorted(k for k in mapped if k.endswith("position_ids"))
    assert not (report.missing or report.resampled or report.reinitialised or report.skipped)
    assert final.keys() == target.keys()
    assert len(report.loaded) == len(manifest) - 4
    for key in report.loaded:
        assert final[key].shape == target[key].shape


# ----------------------------------------------------------------------------- synthetic VQA set


def test_synthetic_questions_are_answered_by_the_scene():
    from albef.data.synthetic import SHAPES, Shape, vqa_questions
    scene = [Shape("circle", "red", "small", (0.3, 0.5)), Shape("circle", "blue", "large", (0.7, 0.5))]
    for seed in range(20):
        pairs = dict(vqa_questions(random.Random(seed), scene))
        assert not any(q.startswith("what colour") for q in pairs)  # two circles: ambiguous, never asked
        ((question, answer),) = pairs.items()
        assert answer == ("2" if question == "how many circles are there?" else "0")
        assert question in {f"how many {s}s are there?" for s in SHAPES}
    scene = [Shape("star", "green", "small", (0.5, 0.3)), Shape("square", "pink", "small", (0.5, 0.7))]
    seen = {}
    for seed in range(40):
        seen.update(vqa_questions(random.Random(seed), scene))
    assert seen["what colour is the star?"] == "green" and seen["what colour is the square?"] == "pink"
    assert seen["how many stars are there?"] == "1" and seen["how many circles are there?"] == "0"


def test_synthetic_vqa_set_format(tmp_path):
    from albef.data.synthetic import generate_vqa_set
    paths = generate_vqa_set(str(tmp_path), num_train=12, num_test=4, image_size=32)
    answer_list = json.loads(Path(paths["answer_list"]).read_text())
    ids = set()
    for split in ("train", "val", "test"):
        entries = json.loads(Path(paths[split]).read_text())
        assert len(entries) >= (12 if split == "train" else 4)
        for e in entries:
            assert set(e) == {"question_id", "question", "image", "answer", "dataset", "answer_type"}
            assert e["dataset"] == "vqa" and e["answer_type"] == ("number" if e["question"].startswith("how") else "other")
            assert (tmp_path / e["image"]).is_file() and len(e["answer"]) == 10
            assert set(e["answer"]) <= set(answer_list)
            ids.add(e["question_id"])
    assert len(ids) == sum(len(json.loads(Path(paths[s]).read_text())) for s in ("train", "val", "test"))
    assert (tmp_path / "bert" / "vocab.txt").is_file()


# ----------------------------------------------------------------------------- the task (albef-vqa)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    from albef.data.synthetic import generate_vqa_set
    return generate_vqa_set(str(tmp_path_factory.mktemp("vqa_data")), num_train=6, num_test=3, image_size=32)


def _cli_args(data, run, *extra):
    return ["--config", str(CONFIGS / "test_tiny.yaml"), "--output-dir", str(run),
            f"model.text.bert={data['bert']}", f"data.train_files=[{data['train']}]",
            f"data.image_root={data['image_root']}", f"eval.val_files=[{data['val']}]",
            f"eval.test_files=[{data['test']}]", f"eval.image_root={data['image_root']}",
            f"vqa.answer_list={data['answer_list']}", "vqa.k_test=3", *extra]


def _brute_force_accuracy(results, annotation_file, answer_type=None):
    """The official VQA accuracy by its definition: each annotator left out in turn, min(#others
    who gave the answer / 3, 1), averaged (the demo answers, digits and colour words, are already
    normalised)."""
    entries = {e["question_id"]: e for e in json.loads(Path(annotation_file).read_text())}
    scores = []
    for r in results:
        humans = entries[r["question_id"]]["answer"]
        if answer_type in (None, entries[r["question_id"]]["answer_type"]):
            subsets = [humans[:i] + humans[i + 1:] for i in range(len(humans))]
            scores.append(sum(min(1.0, others.count(r["answer"]) / 3) for others in subsets) / len(subsets))
    return 100 * sum(scores) / len(scores)


@pytest.mark.slow
def test_cli_trains_and_evaluates_on_a_tiny_generated_set(vqa_data, tmp_path):
    from albef.tasks.vqa import main

    run = tmp_path / "run"
    assert main(_cli_args(vqa_data, run, "train.max_steps=2", "train.batch_size=4")) == 0
    answer_list = json.loads(Path(vqa_data["answer_list"]).read_text())
    for split in ("val", "test"):
        results = json.loads((run / f"vqa_result_{split}.json").read_text())
        questions = json.loads(Path(vqa_data[split]).read_text())
        assert [r["question_id"] for r in results] == [q["question_id"] for q in questions]
        assert all(set(r) == {"question_id", "answer"} and r["answer"] in answer_list for r in results)
    metrics = json.loads((run / "results" / "test_latest.json").read_text())
    metrics = metrics.get("metrics", metrics)
    assert metrics["acc"] == pytest.approx(_brute_force_accuracy(results, vqa_data["test"]))
    for kind in ("number", "other"):
        assert metrics[f"acc_{kind}"] == pytest.approx(_brute_force_accuracy(results, vqa_data["test"], kind))
    assert 0 <= metrics["majority_acc"] <= 100
    assert (run / "best.pt").is_file()

    # --evaluate of the best checkpoint answers the same
    first = (run / "vqa_result_test.json").read_text()
    assert main(_cli_args(vqa_data, run, "--evaluate")) == 0
    assert (run / "vqa_result_test.json").read_text() == first


@pytest.mark.distributed
def test_two_process_training_and_evaluation_answer_every_question_once(vqa_data, tmp_path):
    """`torchrun -m albef.tasks.vqa` (gloo): each rank answers its share, rank 0 writes them all, in
    file order, and --evaluate of the trained weights in one process gives the same answers."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import run_torchrun
    from albef.tasks.vqa import main

    run = tmp_path / "run"
    run_torchrun(["-m", "albef.tasks.vqa", *_cli_args(vqa_data, run, "train.max_steps=2", "train.batch_size=2",
                                                       "eval.batch_size=2")])
    results = json.loads((run / "vqa_result_test.json").read_text())
    questions = json.loads(Path(vqa_data["test"]).read_text())
    assert [r["question_id"] for r in results] == [q["question_id"] for q in questions]
    assert main(_cli_args(vqa_data, tmp_path / "single", "--evaluate", "--init-from", str(run / "best.pt"))) == 0
    assert json.loads((tmp_path / "single" / "vqa_result_test.json").read_text()) == results


@pytest.mark.slow
def test_cli_bad_answer_list_is_one_line_exit_2(vqa_data, tmp_path, capsys):
    from albef.tasks.vqa import main

    bad = tmp_path / "answers.json"
    bad.write_text(json.dumps(["red", "red"]))
    assert main(_cli_args(vqa_data, tmp_path / "run", f"vqa.answer_list={bad}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "answers.json" in err and "'red'" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pt"))


@needs_original
@pytest.mark.slow
def test_cli_evaluates_the_original_tiny_vqa_checkpoint(vqa_data, tmp_path, capsys):
    """The released format through `--init-from ... --evaluate`: loads completely and answers."""
    from albef.tasks.vqa import main

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text((DOWNSTREAM / "configs" / "config_bert_tiny_l12.json").read_text())
    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    words = ["red", "green", "blue", "what", "colour", "is", "the", "how", "many", "are", "there"]
    vocab = [special.get(i, words[i - 1000] if 1000 <= i < 1000 + len(words) else f"tok{i}") for i in range(30522)]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    args = _cli_args(vqa_data, tmp_path / "run", "--evaluate", "--init-from", str(DOWNSTREAM / "tiny_vqa.pth"),
                     f"model.text.bert={bert}", "model.text.fusion_layer=6",
                     "model.text.config_overrides.num_hidden_layers=12",
                     "model.vision.image_size=96", "model.vision.patch_size=16", "model.vision.embed_dim=64",
                     "model.vision.depth=2", "model.vision.num_heads=4", "model.vision.mlp_ratio=4.0")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "tiny_vqa.pth" in err and "missing" not in err
    results = json.loads((tmp_path / "run" / "vqa_result_test.json").read_text())
    assert len(results) == len(json.loads(Path(vqa_data["test"]).read_text()))


def test_model_from_bert_weights_decoder_takes_the_first_layers_and_mlm_head(tmp_path):
    """ALBEF builds both from bert-base-uncased: the decoder gets its first layers and MLM head."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_tiny_bert
    from transformers import BertForMaskedLM

    from albef.config import Config
    from albef.models import build_vqa_model

    bert = write_tiny_bert(tmp_path / "bert", hf_class=BertForMaskedLM)
    cfg = Config.from_dict({"model": {
        "vision": {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "pretrained": False},
        "text": {"bert": str(bert), "pretrained": True, "fusion_layer": 2}}})
    model = build_vqa_model(cfg.model)
    hf = BertForMaskedLM.from_pretrained(str(bert)).state_dict()
    decoder = model.text_decoder.state_dict()
    assert len(model.text_decoder.bert.encoder.layer) == 2 and model.text_encoder.cls is None
    for key, value in decoder.items():
        if ".crossattention." not in key and key in hf:
            assert torch.equal(value, hf[key]), key
    assert any(".crossattention." in k for k in decoder)
    assert torch.equal(model.text_encoder.state_dict()["bert.encoder.layer.3.output.dense.weight"],
                       hf["bert.encoder.layer.3.output.dense.weight"])
