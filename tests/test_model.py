"""The ALBEF pretraining model: outputs, loss switches, ITC ce/kl, momentum, queue, negatives, MLM."""

import json
import os
from pathlib import Path

import pytest
import timm
import torch

from albef.checkpoint import CheckpointError, resample_pos_embed
from albef.config import load_config
from albef.build import build_model
from albef.models.albef import ALBEF, mask_tokens, sample_negatives
from albef.models.bert import TextEncoder
from albef.models.vision import build_vision_encoder
from conftest import TOKENS, make_batch, make_model, tiny_config, write_tiny_bert

torch.set_num_threads(2)
ALBEF_ORIGINAL = Path(os.environ.get("ALBEF_ORIGINAL_DIR") or Path(__file__).resolve().parents[2] / "shared" / "albef_original")
EXPECTED_KEYS = {"loss", "loss_itc", "loss_itm", "loss_mlm", "itc_ce", "itc_kl", "itc_entropy", "queue_update"}


def test_forward_backward_returns_every_term(tmp_path):
    model = make_model(tmp_path)
    images, ids, mask = make_batch()
    out = model(images, ids, mask, alpha=0.4, ids=torch.tensor([0, 1, 1]))
    assert set(out) == EXPECTED_KEYS
    for key in EXPECTED_KEYS - {"queue_update"}:
        assert out[key].dim() == 0 and torch.isfinite(out[key]), key
    torch.testing.assert_close(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_mlm"])
    out["loss"].backward()
    online = [n for n, p in model.named_parameters() if p.requires_grad]
    assert online and all(model.get_parameter(n).grad is not None for n in online)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    image_feat_m, text_feat_m, queue_ids = out["queue_update"]
    assert image_feat_m.shape == text_feat_m.shape == (3, 16) and not image_feat_m.requires_grad
    assert queue_ids.tolist() == [0, 1, 1]


@pytest.mark.parametrize("off", ["itc", "itm", "mlm"])
def test_a_zero_weight_term_is_not_computed(tmp_path, off):
    model = make_model(tmp_path, {off: 0.0})
    images, ids, mask = make_batch()
    out = model(images, ids, mask, alpha=0.4)
    assert f"loss_{off}" not in out
    if off == "itc":
        assert not {"itc_ce", "itc_kl", "itc_entropy"} & set(out)
    on = [k for k in ("itc", "itm", "mlm") if k != off]
    torch.testing.assert_close(out["loss"], sum(out[f"loss_{k}"] for k in on))
    out["loss"].backward()


def test_itc_ce_and_kl_same_gradients_and_kl_zero_at_the_targets(tmp_path):
    images, ids, mask = make_batch()
    outputs, grads = {}, {}
    for kind in ("ce", "kl"):
        model = make_model(tmp_path / kind, {"itm": 0.0, "mlm": 0.0}, itc=kind)
        torch.manual_seed(3)
        outputs[kind] = model(images, ids, mask, alpha=0.4)
        outputs[kind]["loss"].backward()
        grads[kind] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ce, kl = outputs["ce"], outputs["kl"]
    torch.testing.assert_close(ce["loss_itc"] - kl["loss_itc"], ce["itc_entropy"], rtol=0, atol=1e-5)
    assert ce["loss_itc"] - kl["loss_itc"] > 0.1
    torch.testing.assert_close(grads["ce"], grads["kl"], rtol=1e-4, atol=1e-6)

    # A fresh model's momentum copy equals the model: with alpha = 1 the targets are its own
    # predictions, so the KL term is 0 (eval mode: no dropout in either copy).
    model.eval()
    out = model(images, ids, mask, alpha=1.0)
    assert out["loss_itc"].abs() < 1e-5 and out["itc_kl"].abs() < 1e-5
    torch.testing.assert_close(out["itc_ce"], out["itc_entropy"], rtol=0, atol=1e-5)


def test_momentum_params_are_untouched_by_backward_and_follow_the_ema(tmp_path):
    model = make_model(tmp_path)
    images, ids, mask = make_batch()
    momentum_before = {n: p.clone() for n, p in model.named_parameters() if n.split(".")[0].endswith("_m")}
    assert momentum_before and not any(model.get_parameter(n).requires_grad for n in momentum_before)
    model(images, ids, mask, alpha=0.4)["loss"].backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    for name, before in momentum_before.items():
        assert torch.equal(model.get_parameter(name), before), name
    model.momentum_update()
    for name, before in momentum_before.items():
        online = model.get_parameter(name.replace("_m.", ".", 1))
        expected = model.momentum * before + (1 - model.momentum) * online
        torch.testing.assert_close(model.get_parameter(name), expected, rtol=0, atol=1e-6)
    assert not torch.equal(model.get_parameter("vision_proj_m.weight"), momentum_before["vision_proj_m.weight"])


def test_enqueue_writes_momentum_features_and_ids_used_as_positives(tmp_path):
    model = make_model(tmp_path)
    images, ids, mask = make_batch()
    out = model(images, ids, mask, alpha=0.4, ids=torch.tensor([7, 8, 8]))
    model.enqueue(*out["queue_update"])
    image_feat_m, text_feat_m, _ = out["queue_update"]
    torch.testing.assert_close(model.image_queue[:, :3], image_feat_m.t())
    torch.testing.assert_close(model.text_queue[:, :3], text_feat_m.t())
    assert model.idx_queue[0].tolist() == [7, 8, 8, -1, -1, -1, -1, -1] and int(model.queue_ptr) == 3
    assert model._queue_positives(torch.tensor([8, 5]), 2)[:, :4].tolist() == [
        [False, True, True, False], [False, False, False, False]]
    out = model(images, ids, mask, alpha=0.4)  # no ids: the queue holds negatives only
    model.enqueue(*out["queue_update"])
    assert model.idx_queue[0].tolist() == [7, 8, 8, -1, -1, -1, -1, -1] and int(model.queue_ptr) == 6


def test_hard_negatives_are_never_positives():
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    exclude = ids[:, None] == ids[None, :]
    sim = torch.randn(7, 7) * 5
    for _ in range(200):
        neg, valid = sample_negatives(sim, exclude)
        assert valid.all() and not exclude[torch.arange(7), neg].any()
    neg, valid = sample_negatives(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert not valid.any() and neg.shape == (3,)


@pytest.mark.parametrize("batch_size, sample_ids", [(1, None), (1, [4]), (3, [5, 5, 5]), (3, None)])
def test_itm_survives_batches_without_valid_negatives(tmp_path, batch_size, sample_ids):
    model = make_model(tmp_path, {"itc": 0.0, "mlm": 0.0})
    images, ids, mask = make_batch(batch_size)
    sample_ids = None if sample_ids is None else torch.tensor(sample_ids)
    out = model(images, ids, mask, alpha=0.4, ids=sample_ids)
    assert torch.isfinite(out["loss_itm"])
    out["loss"].backward()


@pytest.mark.parametrize("mask_sep", [True, False])
def test_mlm_never_masks_special_tokens(mask_sep):
    """ALBEF never masks [PAD] and [CLS] but masks [SEP] like a word; mask_sep=False spares it too."""
    torch.manual_seed(0)
    ids = torch.randint(5, 48, (64, 20))
    ids[:, 0], ids[:, 12], ids[:, 13:] = TOKENS.cls, TOKENS.sep, TOKENS.pad
    masked, labels = mask_tokens(ids, 1.0, TOKENS, vocab_size=48, mask_sep=mask_sep)
    special = torch.isin(ids, torch.tensor([TOKENS.pad, TOKENS.cls] + ([] if mask_sep else [TOKENS.sep])))
    assert torch.equal(masked[special], ids[special]) and (labels[special] == -100).all()
    assert torch.equal(labels[~special], ids[~special])
    assert (labels[:, 12] == TOKENS.sep).all() == mask_sep
    share_mask = (masked[~special] == TOKENS.mask).float().mean()
    share_kept = (masked[~special] == ids[~special]).float().mean()
    assert 0.75 < share_mask < 0.85 and 0.07 < share_kept < 0.15
    masked, labels = mask_tokens(ids, 0.15, TOKENS, vocab_size=48, mask_sep=mask_sep)
    assert 0.1 < (labels != -100).float().sum() / (~special).sum() < 0.2
    assert torch.equal(masked[labels == -100], ids[labels == -100])


def test_model_masks_sep_by_config(tmp_path):
    assert make_model(tmp_path).never_masked.tolist() == [TOKENS.pad, TOKENS.cls]
    assert make_model(tmp_path, mlm_mask_sep=False).never_masked.tolist() == [TOKENS.pad, TOKENS.cls, TOKENS.sep]
    assert "never_masked" not in make_model(tmp_path).state_dict()


def test_encoders_and_itm_score(tmp_path):
    model = make_model(tmp_path).eval()
    images, ids, mask = make_batch()
    with torch.no_grad():
        image_feat, text_feat = model.encode_image(images), model.encode_text(ids, mask)
        score = model.itm_score(images, ids, mask)
        image_embeds, feat = model.image_tokens(images)
    torch.testing.assert_close(image_feat.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_feat.norm(dim=-1), torch.ones(3))
    assert image_embeds.shape == (3, 17, 24) and torch.equal(feat, image_feat)
    assert score.shape == (3,) and ((score > 0) & (score < 1)).all()


def test_tokenizer_and_config_vocab_mismatch_is_reported(tmp_path):
    cfg = tiny_config(tmp_path)
    write_tiny_bert(Path(cfg.model.text.bert), vocab_size=60)
    with pytest.raises(ValueError, match="vocab_size=60"):
        build_model(cfg)


@pytest.mark.skipif(not (ALBEF_ORIGINAL / "tiny_albef_pretrain.pth").is_file(),
                    reason="../shared/albef_original/tiny_albef_pretrain.pth (reference ALBEF checkpoint) is absent")
def test_state_dict_keys_match_the_original_albef_checkpoint(tmp_path):
    reference = torch.load(ALBEF_ORIGINAL / "tiny_albef_pretrain.pth", map_location="cpu", weights_only=True)["model"]
    bert_config = json.loads((ALBEF_ORIGINAL / "config_bert_tiny.json").read_text())
    bert_dir = tmp_path / "bert"
    bert_dir.mkdir()
    (bert_dir / "config.json").write_text(json.dumps(bert_config))
    vit = timm.create_model("deit_base_patch16_224", img_size=64, num_classes=0, global_pool="", embed_dim=64,
                            depth=2, num_heads=4, patch_size=16, mlp_ratio=4)
    text = TextEncoder.from_pretrained(bert_dir, bert_config["fusion_layer"], bert_config["encoder_width"],
                                       load_weights=False)
    model = ALBEF(vit, text, TOKENS, embed_dim=32, queue_size=64)
    ours = model.state_dict()
    ignored = {"idx_queue"}  # pretraining ALBEF keeps no image ids
    ignored |= {k for k in reference if k.endswith("embeddings.position_ids")}  # a constant buffer
    assert set(ours) - ignored == set(reference) - ignored
    assert all(ours[k].shape == reference[k].shape for k in set(reference) - ignored)
    model.load_state_dict({k: v for k, v in reference.items() if k not in ignored}, strict=False)
    assert torch.equal(model.text_encoder.cls.predictions.decoder.weight,
                       reference["text_encoder.bert.embeddings.word_embeddings.weight"])


def test_vision_checkpoint_init_resamples_pos_embed_and_drops_the_head(tmp_path):
    vcfg = tiny_config(tmp_path).model.vision
    torch.manual_seed(0)
    source = timm.create_model(vcfg.arch, img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                               mlp_ratio=2.0, num_classes=5)
    state = {f"visual_encoder.{k}": v for k, v in source.state_dict().items()}
    state["text_encoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, tmp_path / "albef.pth")
    vcfg.checkpoint = str(tmp_path / "albef.pth")
    encoder = build_vision_encoder(vcfg).eval()
    assert encoder.pos_embed.shape == (1, 17, 24)
    torch.testing.assert_close(encoder.pos_embed[:, 0], source.pos_embed[:, 0])
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(images), encoder.forward_features(images))

    vcfg.embed_dim = vcfg.num_heads = 4
    with pytest.raises(CheckpointError, match="18 tensors differ in shape .*blocks.0.attn.proj.bias") as err:
        build_vision_encoder(vcfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prefix", ["module.", "model.", ""])
def test_deit_shaped_file_with_wrapper_prefix_loads_every_tensor(tmp_path, prefix):
    vcfg = tiny_config(tmp_path).model.vision
    torch.manual_seed(1)
    source = timm.create_model(vcfg.arch, img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                               mlp_ratio=2.0, num_classes=10)  # a DeiT classifier, head included
    torch.save({"model": {prefix + k: v for k, v in source.state_dict().items()}}, tmp_path / "deit.pth")
    vcfg.checkpoint = str(tmp_path / "deit.pth")
    encoder = build_vision_encoder(vcfg)
    for key, value in encoder.state_dict().items():
        if key == "pos_embed":
            expected = resample_pos_embed(source.pos_embed.detach(), (4, 4))
            assert value.shape == (1, 17, 24)
            torch.testing.assert_close(value, expected, rtol=0, atol=0)
        else:
            assert torch.equal(value, source.state_dict()[key]), key


def test_vision_file_missing_a_block_is_refused(tmp_path):
    vcfg = tiny_config(tmp_path).model.vision
    source = timm.create_model(vcfg.arch, img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, mlp_ratio=2.0)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.0.mlp")}
    torch.save(state, tmp_path / "vit.pth")
    vcfg.checkpoint = str(tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="missing keys 4 .*blocks.0.mlp.fc1.bias"):
        build_vision_encoder(vcfg)


def test_pretraining_config_starts_the_vit_from_deit():
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml"))
    assert cfg.model.vision.arch == "deit_base_patch16_224"
    assert cfg.model.vision.pretrained or cfg.model.vision.checkpoint


# ----------------------------------------------------------------------------- masks from the collate


def test_collate_masking_is_per_sample_deterministic_and_bert_distributed():
    from albef.data.masking import MLMMasking

    masking = MLMMasking(0.15, TOKENS, vocab_size=48)
    torch.manual_seed(0)
    ids = torch.randint(5, 48, (400, 20))
    ids[:, 0], ids[:, 12], ids[:, 13:] = TOKENS.cls, TOKENS.sep, TOKENS.pad
    seeds = list(range(1000, 1400))
    out = masking(ids, seeds)
    again = masking(ids.flip(0), seeds[::-1])  # another batch order: each row keeps its mask
    assert torch.equal(again["mlm_input_ids"].flip(0), out["mlm_input_ids"])
    assert torch.equal(again["mlm_labels"].flip(0), out["mlm_labels"])
    other = masking(ids, [s + 1 for s in seeds])
    assert not torch.equal(other["mlm_labels"], out["mlm_labels"])
    labels, masked = out["mlm_labels"], out["mlm_input_ids"]
    assert torch.equal(torch.stack([out["mlm_batch"], out["mlm_position"]]), (labels != -100).nonzero().t())
    special = torch.isin(ids, torch.tensor([TOKENS.pad, TOKENS.cls]))
    assert (labels[special] == -100).all() and torch.equal(masked[special], ids[special])
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum() / (~special).sum()  # 400 * 12 maskable tokens: sd 0.005
    assert 0.13 < rate < 0.17
    as_mask = (masked[chosen] == TOKENS.mask).float().mean()
    unchanged = (masked[chosen] == ids[chosen]).float().mean()
    assert 0.75 < as_mask < 0.85 and 0.07 < unchanged < 0.16


def test_model_with_collate_masks_equals_its_own_masking_with_those_masks(tmp_path, monkeypatch):
    """The forward given the collate's masks computes what it computes when its own masking
    draws the same masks, and it never asks the device for the masked positions."""
    import albef.models.albef as albef_module
    from albef.data.masking import MLMMasking

    model = make_model(tmp_path).train()
    images, input_ids, attention_mask = make_batch(4)
    masks = MLMMasking(0.5, TOKENS, model.text_encoder.config.vocab_size)(input_ids, [11, 12, 13, 14])
    assert len(masks["mlm_batch"]) > 0
    torch.manual_seed(3)
    real_nonzero = torch.Tensor.nonzero
    calls = []

    def counting_nonzero(self, *args, **kwargs):
        calls.append(self.shape)
        return real_nonzero(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "nonzero", counting_nonzero)
    given = model(images, input_ids, attention_mask, alpha=0.4, mlm_masks=masks)
    assert calls == []  # no masked-position lookup in the step
    monkeypatch.setattr(albef_module, "mask_tokens",
                        lambda *a, **k: (masks["mlm_input_ids"], masks["mlm_labels"]))
    torch.manual_seed(3)
    own = model(images, input_ids, attention_mask, alpha=0.4)
    assert len(calls) == 1
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert torch.equal(given[key], own[key]), key
