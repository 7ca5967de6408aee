"""Our BERT text/fusion encoder against transformers' BertModel, fusion mode and weight loading."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForMaskedLM, BertModel

from albef.checkpoint import CheckpointError
from albef.models.bert import TextEncoder
from conftest import write_tiny_bert

IMAGE_WIDTH = 24


def _batch():
    ids = torch.tensor([[2, 7, 9, 11, 13, 3], [2, 8, 10, 3, 0, 0], [2, 20, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_text_mode_matches_hf_bert_model(tmp_path, attention):
    bert_dir = write_tiny_bert(tmp_path / "bert", BertModel)
    reference = BertModel.from_pretrained(bert_dir).eval()
    ours = TextEncoder.from_pretrained(bert_dir, fusion_layer=4, encoder_width=IMAGE_WIDTH, attention=attention,
                                       mlm_head=False).eval()
    ids, mask = _batch()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
        got = ours.bert(ids, mask, mode="text")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_masked_lm_checkpoint_gives_hf_mlm_logits(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert", BertForMaskedLM)
    reference = BertForMaskedLM.from_pretrained(bert_dir).eval()
    ours = TextEncoder.from_pretrained(bert_dir, fusion_layer=4, encoder_width=IMAGE_WIDTH).eval()
    ids, mask = _batch()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        positions = mask.bool()
        got = ours.mlm_logits(ours.bert(ids, mask, mode="text"), positions)
    torch.testing.assert_close(got, expected[positions], rtol=0, atol=1e-5)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias


def _hub_layout_state(bert_dir):
    """BertForMaskedLM weights as the hub's old bert-base-uncased file names them: `bert.` prefix,
    LayerNorm `gamma`/`beta`, no tied decoder weight; every tensor given a distinctive value."""
    state = load_file(bert_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    hub = {}
    for key, value in state.items():
        if key == "cls.predictions.decoder.weight":
            continue
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        hub[key] = torch.randn(value.shape, generator=generator)
    hub["bert.pooler.dense.weight"] = torch.randn(32, 32, generator=generator)
    hub["bert.pooler.dense.bias"] = torch.randn(32, generator=generator)
    hub["cls.seq_relationship.weight"] = torch.randn(2, 32, generator=generator)
    return hub


def test_hub_layout_with_legacy_layernorm_names_loads_every_tensor(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert", BertForMaskedLM)
    hub = _hub_layout_state(bert_dir)
    ours = TextEncoder.from_pretrained(bert_dir, fusion_layer=2, encoder_width=IMAGE_WIDTH, load_weights=False)
    report = ours.load_bert_state_dict(hub)
    own = ours.state_dict()
    for key, value in hub.items():
        name = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.startswith(("bert.pooler", "cls.seq_relationship")):
            assert key in report.skipped
            continue
        assert torch.equal(own[name], value), name
    assert torch.equal(own["cls.predictions.decoder.weight"], hub["bert.embeddings.word_embeddings.weight"])
    layernorms = [k for k in own if "LayerNorm" in k and "crossattention" not in k]
    assert len(layernorms) == 2 * (1 + 2 * 4 + 1)  # embeddings, 2 per layer, MLM head: all loaded
    assert set(report.new) == {
        f"bert.encoder.layer.{i}.crossattention.{name}"
        for i in (2, 3)
        for name in ("self.query.weight", "self.query.bias", "self.key.weight", "self.key.bias",
                     "self.value.weight", "self.value.bias", "output.dense.weight", "output.dense.bias",
                     "output.LayerNorm.weight", "output.LayerNorm.bias")
    }
    assert ours.bert.encoder.layer[2].crossattention.self.key.weight.shape == (32, IMAGE_WIDTH)


def test_unprefixed_bert_model_file_loads_into_an_encoder_without_mlm_head(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert", BertModel)
    state = load_file(bert_dir / "model.safetensors")
    ours = TextEncoder.from_pretrained(bert_dir, fusion_layer=2, encoder_width=IMAGE_WIDTH, mlm_head=False)
    own = ours.state_dict()
    for key, value in state.items():
        if not key.startswith("pooler"):
            assert torch.equal(own[f"bert.{key}"], value), key


def test_a_bert_file_missing_a_key_is_refused_in_one_line(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert", BertForMaskedLM)
    hub = _hub_layout_state(bert_dir)
    del hub["bert.encoder.layer.1.output.LayerNorm.gamma"]
    ours = TextEncoder.from_pretrained(bert_dir, fusion_layer=2, encoder_width=IMAGE_WIDTH, load_weights=False)
    with pytest.raises(CheckpointError, match="bert.encoder.layer.1.output.LayerNorm.weight") as err:
        ours.load_bert_state_dict(hub)
    assert "\n" not in str(err.value)
    # a BertModel file has no MLM head: a model that needs one does not silently keep a random head
    with pytest.raises(CheckpointError, match="cls.predictions"):
        TextEncoder.from_pretrained(write_tiny_bert(tmp_path / "plain", BertModel), 2, IMAGE_WIDTH)


def test_fusion_mode_uses_the_image_and_composes_with_text_mode(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    model = TextEncoder.from_pretrained(bert_dir, fusion_layer=2, encoder_width=IMAGE_WIDTH, load_weights=False).eval()
    ids, mask = _batch()
    image = torch.randn(3, 5, IMAGE_WIDTH)
    with torch.no_grad():
        text = model.bert(ids, mask, mode="text")
        fused = model.bert(attention_mask=mask, image_embeds=image, mode="fusion", text_embeds=text)
        multimodal = model(ids, mask, image)
        other_image = model.bert(attention_mask=mask, image_embeds=image.flip(0), mode="fusion", text_embeds=text)
    assert fused.shape == (3, 6, 32)
    torch.testing.assert_close(fused, multimodal)
    assert not torch.allclose(fused, other_image)
    with pytest.raises(ValueError, match="image_embeds"):
        model.bert(attention_mask=mask, mode="fusion", text_embeds=text)


def test_eager_returns_cross_attention_maps_and_matches_sdpa(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    sdpa = TextEncoder.from_pretrained(bert_dir, fusion_layer=2, encoder_width=IMAGE_WIDTH, load_weights=False).eval()
    eager = TextEncoder.from_pretrained(bert_dir, fusion_layer=2, encoder_width=IMAGE_WIDTH, load_weights=False,
                                        attention="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    ids, mask = _batch()
    image = torch.randn(3, 5, IMAGE_WIDTH)
    image_mask = torch.tensor([[1, 1, 1, 1, 0]] * 3)
    with torch.no_grad():
        expected = sdpa(ids, mask, image, image_mask=image_mask)
        hidden, maps = eager(ids, mask, image, image_mask=image_mask, output_attentions=True)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-5)
    assert len(maps) == 2 and maps[-1].shape == (3, 4, 6, 5)
    torch.testing.assert_close(maps[-1].sum(-1), torch.ones(3, 4, 6))
    assert maps[-1][..., 4].abs().max() == 0  # masked image token gets no attention


def test_dropout_only_in_training(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert", attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    model = TextEncoder.from_pretrained(bert_dir, fusion_layer=4, encoder_width=IMAGE_WIDTH, load_weights=False)
    ids, mask = _batch()
    with torch.no_grad():
        assert not torch.equal(model.bert(ids, mask, mode="text"), model.bert(ids, mask, mode="text"))
        model.eval()
        assert torch.equal(model.bert(ids, mask, mode="text"), model.bert(ids, mask, mode="text"))


def test_grad_checkpointing_gives_the_same_gradients(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = TextEncoder.from_pretrained(bert_dir, fusion_layer=2, encoder_width=IMAGE_WIDTH, load_weights=False)
    ids, mask = _batch()
    image = torch.randn(3, 5, IMAGE_WIDTH)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(ids, mask, image).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.bert.named_parameters()})
    torch.testing.assert_close(grads[1], grads[0])


def test_config_overrides_apply_and_unknown_keys_fail(tmp_path):
    bert_dir = write_tiny_bert(tmp_path / "bert")
    model = TextEncoder.from_pretrained(bert_dir, 1, IMAGE_WIDTH, {"num_hidden_layers": 2}, load_weights=False)
    assert len(model.bert.encoder.layer) == 2 and model.bert.encoder.layer[0].crossattention is None
    with pytest.raises(ValueError, match="hidden_sizes"):
        TextEncoder.from_pretrained(bert_dir, 1, IMAGE_WIDTH, {"hidden_sizes": 8}, load_weights=False)
    with pytest.raises(FileNotFoundError, match="pretrained=false"):
        TextEncoder.from_pretrained(bert_dir, 1, IMAGE_WIDTH)
