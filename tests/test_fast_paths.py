"""Every shortcut of the training step gives the plain computation's losses and gradients, and
bad numbers skip a step instead of crashing the run.

Equivalence tests switch dropout off (the paths draw their dropout masks in a different order)
and compare losses and every gradient of the plain path with the shortcut's.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from albef.config import load_config
from albef.data.collate import Collator
from albef.data.synthetic import generate_corpus
from albef.dist import DistInfo
from albef.engine.trainer import Trainer
from albef.models import albef as albef_module
from albef.build import build_model
from albef.models import compile_blocks
from albef.models.albef import mask_tokens, sample_negatives, similarity
from albef.tasks.pretrain import PretrainTask
from conftest import TOKENS, assert_same, make_batch, make_model, tiny_config, write_tiny_bert

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def no_dropout_model(tmp_path, **kwargs):
    write_tiny_bert(tmp_path / "bert", **NO_DROPOUT)
    return make_model(tmp_path, **kwargs)


def losses_and_grads(model, batch, seed=3, ids=None, **flags):
    """Loss terms and gradients of one forward/backward with the given model flags."""
    for name, value in flags.items():
        setattr(model, name, value)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same MLM masks and ITM negatives on both paths
    out = model(*batch, alpha=0.4, ids=ids)
    out["loss"].backward()
    losses = {k: v.detach() for k, v in out.items() if k.startswith("loss")}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def assert_close_dicts(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tol)


@pytest.mark.parametrize("flags", [
    dict(cache_image_kv=False),
    dict(prune_last_layer=False),
    dict(cache_image_kv=False, prune_last_layer=False),
])
@pytest.mark.slow
@pytest.mark.parametrize("ids", [None, [7, 8, 8, 9, 7]])
def test_kv_cache_and_pruned_rows_match_the_plain_fusion_pass(tmp_path, flags, ids):
    model = no_dropout_model(tmp_path)
    batch = make_batch(5)
    ids = None if ids is None else torch.tensor(ids)
    fast = losses_and_grads(model, batch, ids=ids, cache_image_kv=True, prune_last_layer=True)
    plain = losses_and_grads(model, batch, ids=ids, **flags)
    assert fast[0]["loss_mlm"] > 0 and fast[0]["loss_itm"] > 0
    assert_close_dicts(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_close_dicts(fast[1], plain[1], rtol=1e-4, atol=1e-6)
    assert "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight" in fast[1]


def reference_forward(model, images, input_ids, attention_mask, alpha):
    """ALBEF's step written out with the public encoder calls (separate text, momentum text,
    ITM fusion and MLM passes over full rows, image tokens copied per row), drawing the random
    numbers in the model's order: MLM masks, then ITM negatives."""
    bert, bert_m = model.text_encoder.bert, model.text_encoder_m.bert
    masked_ids, labels = mask_tokens(input_ids, model.mlm_probability, model.token_ids,
                                     model.text_encoder.config.vocab_size)
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
        image_embeds_m = model.visual_encoder_m(images)
        image_feat_m = F.normalize(model.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
        text_feat_m = F.normalize(model.text_proj_m(bert_m(input_ids, attention_mask, mode="text")[:, 0]), dim=-1)
    image_embeds = model.visual_encoder(images)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    text_embeds = bert(input_ids, attention_mask, mode="text")
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
    image_bank = torch.cat([image_feat_m.t(), model.image_queue], dim=1)
    text_bank = torch.cat([text_feat_m.t(), model.text_queue], dim=1)
    batch_size = len(images)
    targets = torch.zeros(batch_size, image_bank.shape[1])
    targets[:, :batch_size] = torch.eye(batch_size)
    with torch.no_grad():
        t_i2t = alpha * (image_feat_m @ text_bank / model.temp).softmax(1) + (1 - alpha) * targets
        t_t2i = alpha * (text_feat_m @ image_bank / model.temp).softmax(1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(image_feat @ text_bank / model.temp, 1) * t_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(text_feat @ image_bank / model.temp, 1) * t_t2i).sum(1).mean()
    with torch.no_grad():
        exclude = torch.eye(batch_size, dtype=torch.bool)
        neg_images = sample_negatives(text_feat @ image_feat_m.t() / model.temp, exclude)[0]
        neg_texts = sample_negatives(image_feat @ text_feat_m.t() / model.temp, exclude)[0]
    fused = bert(attention_mask=torch.cat([attention_mask, attention_mask, attention_mask[neg_texts]]),
                 image_embeds=torch.cat([image_embeds, image_embeds[neg_images], image_embeds]),
                 text_embeds=torch.cat([text_embeds, text_embeds, text_embeds[neg_texts]]), mode="fusion")
    itm_labels = torch.cat([torch.ones(batch_size), torch.zeros(2 * batch_size)]).long()
    loss_itm = F.cross_entropy(model.itm_head(fused[:, 0]), itm_labels)
    positions = labels != -100
    logits = model.text_encoder.cls.predictions(model.text_encoder(masked_ids, attention_mask, image_embeds))
    with torch.no_grad():
        logits_m = model.text_encoder_m.cls.predictions(model.text_encoder_m(masked_ids, attention_mask,
                                                                             image_embeds_m))
    log_probs = F.log_softmax(logits[positions], dim=-1)
    hard = F.nll_loss(log_probs, labels[positions])
    soft = -(log_probs * logits_m[positions].softmax(-1)).sum(-1).mean()
    return {"loss_itc": (loss_i2t + loss_t2i) / 2, "loss_itm": loss_itm,
            "loss_mlm": (1 - alpha) * hard + alpha * soft}


@pytest.mark.slow
def test_batched_step_matches_albefs_step_written_out(tmp_path):
    """The one-pass text and fusion encoders give the original step's losses and gradients."""
    model = no_dropout_model(tmp_path)
    batch = make_batch(5)
    fast_losses, fast_grads = losses_and_grads(model, batch)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    reference = reference_forward(model, *batch, alpha=0.4)
    sum(reference.values()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close_dicts({k: v for k, v in fast_losses.items() if k != "loss"}, reference, rtol=1e-5, atol=1e-6)
    assert_close_dicts(fast_grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_fixed_padding_matches_dynamic_padding(tmp_path, monkeypatch):
    """Padding every batch to max_tokens (static shapes) changes nothing but the shapes."""
    model = no_dropout_model(tmp_path)
    images, input_ids, mask = make_batch(5)
    extra = 7
    dynamic = losses_and_grads(model, (images, input_ids, mask))

    real_mask_tokens = albef_module.mask_tokens

    def mask_real_columns(ids, *args, **kwargs):  # the dynamic run's random draws, padded
        masked, labels = real_mask_tokens(ids[:, :-extra], *args, **kwargs)
        return F.pad(masked, (0, extra), value=TOKENS.pad), F.pad(labels, (0, extra), value=-100)

    monkeypatch.setattr(albef_module, "mask_tokens", mask_real_columns)
    padded = (images, F.pad(input_ids, (0, extra), value=TOKENS.pad), F.pad(mask, (0, extra)))
    static = losses_and_grads(model, padded)
    assert_close_dicts(dynamic[0], static[0], rtol=1e-5, atol=1e-6)
    assert_close_dicts(dynamic[1], static[1], rtol=1e-4, atol=1e-6)


def test_collator_pads_to_max_tokens_on_request(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(write_tiny_bert(tmp_path / "bert")))
    samples = [{"image": torch.zeros(3, 4, 4), "caption": caption, "id": i, "index": i}
               for i, caption in enumerate(["w1 w2", "w3 w4 w5"])]
    dynamic, static = Collator(tokenizer, 12)(samples), Collator(tokenizer, 12, pad_to_max=True)(samples)
    assert dynamic["input_ids"].shape == (2, 5) and static["input_ids"].shape == (2, 12)
    assert torch.equal(static["input_ids"][:, :5], dynamic["input_ids"])
    assert torch.equal(static["attention_mask"].sum(1), dynamic["attention_mask"].sum(1))


def test_itm_logits_of_pruned_cls_rows_match_full_rows(tmp_path):
    model = no_dropout_model(tmp_path).eval()
    images, ids, mask = make_batch(4)
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
        text = model.text_encoder.bert(ids, mask, mode="text")
        full = model.text_encoder.bert(attention_mask=mask, image_embeds=image_embeds, text_embeds=text,
                                       mode="fusion")
        torch.testing.assert_close(model.itm_logits(image_embeds, text, mask), model.itm_head(full[:, 0]))


def test_output_rows_keep_grad_carrying_cross_attention_maps(tmp_path):
    """Grad-CAM reads the last layer's cross-attention probabilities with their gradient."""
    write_tiny_bert(tmp_path / "bert", **NO_DROPOUT)
    cfg = tiny_config(tmp_path)
    cfg.model.text.attention = "eager"
    torch.manual_seed(0)
    model = build_model(cfg)
    images, ids, mask = make_batch(3)
    image_embeds = model.visual_encoder(images)
    text = model.text_encoder.bert(ids, mask, mode="text")
    hidden, maps = model.text_encoder.bert(attention_mask=mask, image_embeds=image_embeds, text_embeds=text,
                                           mode="fusion", output_attentions=True)
    rows = (torch.arange(3), torch.zeros(3, dtype=torch.long))
    cls, cls_maps = model.text_encoder.bert(attention_mask=mask, image_embeds=image_embeds, text_embeds=text,
                                            mode="fusion", output_attentions=True, output_rows=rows)
    torch.testing.assert_close(cls, hidden[:, 0])
    torch.testing.assert_close(cls_maps[-1][:, :, 0], maps[-1][:, :, 0])
    assert maps[-1].requires_grad and cls_maps[-1].requires_grad
    kv = model.text_encoder.bert.cross_attention_kv(image_embeds)
    cached = model.text_encoder.bert(attention_mask=mask, image_kv=kv, text_embeds=text, mode="fusion")
    torch.testing.assert_close(cached, hidden)


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path):
    """Regional compile keeps the state-dict keys, the losses and the gradients. Compiled with
    the `eager` backend: the same graph capture as train.compile, without inductor's code
    generation, which takes minutes on a shared 2-core CPU."""
    model = no_dropout_model(tmp_path)
    batch = make_batch(4)
    eager = losses_and_grads(model, batch)
    keys = set(model.state_dict())
    compile_blocks(model, backend="eager")
    assert model.text_encoder.bert.encoder.layer[3]._compiled_call_impl is not None
    assert model.visual_encoder_m.blocks[0]._compiled_call_impl is not None
    compiled = losses_and_grads(model, batch)
    assert set(model.state_dict()) == keys
    assert_close_dicts(eager[0], compiled[0], rtol=1e-5, atol=1e-6)
    assert_close_dicts(eager[1], compiled[1], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_matches_plain_backward(tmp_path):
    model = no_dropout_model(tmp_path)
    batch = make_batch(4)
    plain = losses_and_grads(model, batch)
    model.text_encoder.set_grad_checkpointing(True)
    model.visual_encoder.set_grad_checkpointing(True)
    checkpointed = losses_and_grads(model, batch)
    assert_close_dicts(plain[0], checkpointed[0], rtol=1e-5, atol=1e-6)
    assert_close_dicts(plain[1], checkpointed[1], rtol=1e-4, atol=1e-6)


def test_build_model_compiles_by_config(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(type(self).__name__))
    cfg = tiny_config(tmp_path)
    build_model(cfg)
    assert compiled == []
    cfg.train.compile = True
    build_model(cfg)
    assert compiled.count("BertLayer") == 8 and compiled.count("Block") == 2  # online + momentum


# ----------------------------------------------------------------------------- fp32 similarities


def test_similarities_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(16, 64), dim=-1)
    bank = F.normalize(torch.randn(64, 512), dim=0)
    temp = torch.tensor(0.07)
    reference = features @ bank / temp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = features @ bank / temp
        ours = similarity(features, bank, temp)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    assert (naive.float() - reference).abs().max() > 1e-3  # what bf16 would have given


def test_itc_features_and_targets_are_fp32_in_a_bf16_step(tmp_path):
    model = make_model(tmp_path)
    images, ids, mask = make_batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, ids, mask, alpha=0.4)
    image_feat_m, text_feat_m, _ = out["queue_update"]
    assert image_feat_m.dtype == text_feat_m.dtype == torch.float32
    assert out["loss_itc"].dtype == torch.float32 and torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------- non-finite features


def test_nonfinite_similarities_fall_back_to_a_valid_draw():
    sim = torch.randn(4, 4)
    sim[1, 2], sim[3] = float("nan"), float("inf")
    exclude = torch.eye(4, dtype=torch.bool)
    neg, valid = sample_negatives(sim, exclude)
    assert valid.tolist() == [True, False, True, False]
    assert ((neg >= 0) & (neg < 4)).all() and not exclude[[0, 2], neg[[0, 2]]].any()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_corpus(str(tmp_path_factory.mktemp("corpus")), num_train=12, num_test=2,
                           image_size=32, captions_per_image=1)


def _train(corpus, output_dir, poison):
    """Three steps of real pretraining; `poison(model, task)` may corrupt step 2."""
    cfg = load_config(str(CONFIG), [
        f"output_dir={output_dir}", f"data.train_files=[{corpus['train']}]",
        f"data.image_root={corpus['image_root']}", f"model.text.bert={corpus['bert']}",
        "train.batch_size=4", "train.max_steps=3", "train.log_every=1", "train.ckpt_every=100",
    ])
    task = PretrainTask()
    trainer = Trainer(cfg, task, CPU)
    poison(trainer.model, task)
    assert trainer.fit() == 0
    return trainer


@pytest.mark.slow
def test_nan_image_features_skip_the_step_and_the_run_goes_on(corpus, tmp_path):
    """NaN in one image's features at step 2: no crash in the negative sampling, the step is
    skipped, and the run ends where a run whose step 2 was dropped (NaN loss) ends."""
    def nan_features(model, task):
        forward, calls = model.visual_encoder.forward, []

        def poisoned(images):
            out = forward(images)
            calls.append(1)
            return out.index_fill(0, torch.tensor([1]), float("nan")) if len(calls) == 2 else out

        model.visual_encoder.forward = poisoned

    def nan_loss(model, task):
        forward_step, calls = task.forward_step, []

        def poisoned(model, batch, alpha):
            out = forward_step(model, batch, alpha)
            calls.append(1)
            if len(calls) == 2:
                out["loss"], out["loss_itc"] = out["loss"] * float("nan"), out["loss_itc"] * float("nan")
            return out

        task.forward_step = poisoned

    features = _train(corpus, tmp_path / "features", nan_features)
    dropped = _train(corpus, tmp_path / "loss", nan_loss)
    assert features.state.step == 3 and features.state.nonfinite_steps == 1
    assert_same(features.model.state_dict(), dropped.model.state_dict(), "model")
    assert_same(features.optimizer.state_dict(), dropped.optimizer.state_dict(), "optimizer")
    assert int(features.model.queue_ptr) == 8  # steps 1 and 3 enqueued, step 2 did not


# ----------------------------------------------------------------------------- ops.py


def test_take_rows_matches_index_select_forward_and_backward():
    from albef.models.ops import take_rows

    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 3, requires_grad=True)
    index = torch.tensor([0, 5, 5, 2, 0, 0, 3])
    grad = torch.randn(7, 5, 4, 3).transpose(1, 2)  # a head-transposed (non-contiguous) gradient
    expected = x.index_select(0, index)
    (want,) = torch.autograd.grad(expected, x, grad)
    got = take_rows(x, index)
    (have,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, expected)
    torch.testing.assert_close(have, want, rtol=0, atol=1e-6)
    assert take_rows(x, None) is x and take_rows(None, index) is None


def test_cpu_dropout_keeps_each_element_with_probability_1_minus_p():
    from albef.models.ops import Dropout, keep_mask

    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        mask = keep_mask((1999, 1001), p).float()  # odd count: the last word's second half unused
        assert mask.shape == (1999, 1001)
        sd = (p * (1 - p) / mask.numel()) ** 0.5
        assert abs(mask.mean().item() - (1 - p)) < 6 * sd
        halves = mask.flatten()[:-1].view(-1, 2).mean(dim=0)  # both 32-bit halves of a word
        assert (halves - (1 - p)).abs().max().item() < 6 * sd * 2 ** 0.5
        pairs = mask.flatten()[:-1].view(-1, 2)  # halves of one word are independent
        both = (pairs[:, 0] * pairs[:, 1]).mean().item()
        assert abs(both - (1 - p) ** 2) < 6 * sd * 2 ** 0.5
    layer = Dropout(0.1).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), y)  # the torch generator decides: seeded runs repeat
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, kept.float() / 0.9)
    assert torch.equal(layer.eval()(x), x)


def test_tied_word_gradient_equals_autograds(tmp_path, monkeypatch):
    """The MLM step's word-embedding gradient joined with the tied decoder's in one tensor
    (ops.TiedGradient) equals the stock autograd sum of the two, for every parameter."""
    from albef.models import ops
    from albef.models.bert import TextEncoder

    model = no_dropout_model(tmp_path)
    assert model.text_encoder.tied_mlm_decoder
    batch = make_batch(4)
    joined = []
    stock = ops._JoinedEmbedding.backward

    def spy(ctx, grad):
        joined.append(ctx.tied.pending is not None)  # the decoder's gradient was waiting
        return stock(ctx, grad)

    monkeypatch.setattr(ops._JoinedEmbedding, "backward", staticmethod(spy))
    losses, grads = losses_and_grads(model, batch)
    assert joined == [True]
    monkeypatch.setattr(TextEncoder, "tied_mlm_decoder", property(lambda self: False))
    plain_losses, plain_grads = losses_and_grads(model, batch)
    assert joined == [True]  # the stock path this time
    assert_close_dicts(losses, plain_losses, rtol=0, atol=0)
    assert_close_dicts(grads, plain_grads, rtol=1e-6, atol=1e-7)
    name = "text_encoder.bert.embeddings.word_embeddings.weight"
    assert grads[name].is_contiguous() and grads[name].abs().sum() > 0


def test_tied_gradient_without_the_linear_layer_and_with_padding():
    """Only the lookup took part: its gradient alone, the padding row left at zero."""
    from albef.models.ops import TiedGradient

    torch.manual_seed(0)
    weight = torch.randn(10, 4, requires_grad=True)
    ids = torch.tensor([[1, 0, 3], [3, 3, 0]])
    out = TiedGradient().embedding(ids, weight, padding_idx=0)
    grad = torch.randn(2, 3, 4)
    (have,) = torch.autograd.grad(out, weight, grad)
    (want,) = torch.autograd.grad(F.embedding(ids, weight, padding_idx=0), weight, grad)
    torch.testing.assert_close(have, want)
    assert have[0].abs().sum() == 0
