"""The one model factory: every model of `cfg.model` (a `ModelConfig`) built from the same parts.

`build_encoders` checks the tokenizer against the BERT config, then builds the ViT and the BERT
text/fusion encoder once, for every model: ALBEF (`build_albef`), the VE / NLVR2 classifiers
(`build_classifier`), NLVR2's text assignment (`build_text_assignment`) and VQA
(`build_vqa_model`). The factory reads the model section only; what a model needs beyond it
(loss settings, number of classes) comes as its own arguments. Binding a whole `Config` to a
model (loss section, `train.compile`) is albef/build.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from albef.config import ConfigError
from albef.models.albef import ALBEF, LOSS_TERMS
from albef.models.bert import TextEncoder, bert_config, load_tokenizer, read_bert_weights
from albef.models.classify import (Classifier, TextAssignment, double_fusion_layers,
                                   two_image_bert_config)
from albef.models.vision import build_vision_encoder
from albef.models.vqa import AnswerDecoder, VQAModel, decoder_config
from albef.masking import TokenIds

__all__ = ["Encoders", "build_tokenizer", "checked_tokenizer", "build_text_encoder", "build_encoders", "build_albef",
           "build_classifier", "build_text_assignment", "build_vqa_model", "compile_blocks"]


def build_tokenizer(model_cfg: Any):
    """The tokenizer of `model.text.tokenizer`, or of `model.text.bert` when that is unset (no
    remote code: `load_tokenizer`)."""
    return load_tokenizer(model_cfg.text.tokenizer or model_cfg.text.bert)


def checked_tokenizer(model_cfg: Any):
    """`build_tokenizer(model_cfg)`, after checking, before any model is built, that its
    vocabulary has the size of the BERT config's `vocab_size`; one-line ConfigError otherwise."""
    tcfg = model_cfg.text
    tokenizer = build_tokenizer(model_cfg)
    vocab_size = bert_config(tcfg.bert, tcfg.fusion_layer, 0, tcfg.config_overrides).vocab_size
    if len(tokenizer) != vocab_size:
        name = tcfg.tokenizer or tcfg.bert
        raise ConfigError(f"model.text.tokenizer: tokenizer {str(name)!r} has {len(tokenizer)} tokens but BERT config "
                          f"{str(tcfg.bert)!r} has vocab_size={vocab_size}; use a matching model.text.tokenizer "
                          "(its vocab.txt) or config.json")
    return tokenizer


def build_text_encoder(model_cfg: Any, encoder_width: int, num_images: int = 1, mlm_head: bool = False) -> TextEncoder:
    """The BERT text/fusion encoder of `model.text` (cross-attention to `encoder_width` image
    states from `fusion_layer` on); for two images with every fusion layer doubled
    (`two_image_bert_config`). Pretrained BERT weights (when `model.text.pretrained`) load
    completely, for two images through `double_fusion_layers`."""
    tcfg = model_cfg.text
    config = bert_config(tcfg.bert, tcfg.fusion_layer, encoder_width, tcfg.config_overrides)
    if num_images == 2:
        config = two_image_bert_config(config)
    encoder = TextEncoder(config, tcfg.attention, mlm_head)
    if tcfg.pretrained:
        weights = read_bert_weights(tcfg.bert)
        if num_images == 2:
            weights = double_fusion_layers(weights, tcfg.fusion_layer)
        encoder.load_bert_state_dict(weights, source=str(tcfg.bert)).print()
    encoder.set_grad_checkpointing(tcfg.grad_checkpointing)
    return encoder


@dataclass
class Encoders:
    """The parts every model of the framework starts from."""

    tokenizer: Any
    vision: nn.Module
    text: TextEncoder


def build_encoders(model_cfg: Any, num_images: int = 1, mlm_head: bool = False) -> Encoders:
    """The checked tokenizer, then the ViT of `model.vision`, then the text encoder of
    `model.text` (in this order: every rank draws the same initial weights from the seed)."""
    tokenizer = checked_tokenizer(model_cfg)
    vision = build_vision_encoder(model_cfg.vision)
    return Encoders(tokenizer, vision, build_text_encoder(model_cfg, vision.embed_dim, num_images, mlm_head))


def build_albef(model_cfg: Any, loss_weights: dict[str, float] | None = None, mlm_probability: float = 0.15,
                itc_kind: str = "ce", itc_gather_batch: bool = False, itm_negatives: str = "local",
                mlm_mask_sep: bool = True) -> ALBEF:
    """ALBEF of `model_cfg` (timm ViT + BERT text/fusion encoder + momentum copies) with the loss
    settings given (ALBEF's own arguments); a model whose MLM weight is 0 (fine-tuning) has no
    MLM head."""
    weights = dict(loss_weights or dict.fromkeys(LOSS_TERMS, 1.0))
    parts = build_encoders(model_cfg, mlm_head=weights.get("mlm", 0) > 0)
    tokenizer = parts.tokenizer
    return ALBEF(
        parts.vision,
        parts.text,
        TokenIds(pad=tokenizer.pad_token_id, cls=tokenizer.cls_token_id, sep=tokenizer.sep_token_id,
                 mask=tokenizer.mask_token_id),
        embed_dim=model_cfg.embed_dim,
        temp=model_cfg.temp,
        momentum=model_cfg.momentum,
        queue_size=model_cfg.queue_size,
        mlm_probability=mlm_probability,
        loss_weights=weights,
        itc_kind=itc_kind,
        itc_gather_batch=itc_gather_batch,
        itm_negatives=itm_negatives,
        mlm_mask_sep=mlm_mask_sep,
    )


def build_classifier(model_cfg: Any, num_classes: int, num_images: int = 1) -> Classifier:
    """VE (3 classes, one image) or NLVR2 (2 classes, two images) model of `model_cfg`."""
    parts = build_encoders(model_cfg, num_images)
    return Classifier(parts.vision, parts.text, num_classes, num_images, model_cfg.distill, model_cfg.momentum)


def build_text_assignment(model_cfg: Any) -> TextAssignment:
    """NLVR2's TA pretraining model of `model_cfg` (embed_dim, temp; no momentum copies)."""
    parts = build_encoders(model_cfg, num_images=2)
    return TextAssignment(parts.vision, parts.text, model_cfg.embed_dim, model_cfg.temp)


def build_vqa_model(model_cfg: Any) -> VQAModel:
    """The VQA model of `model_cfg` (sizes, BERT, `distill`, `momentum`): timm ViT, question
    encoder without MLM head (ALBEF's VQA question encoder is a BertModel), answer decoder of
    `decoder_config`; both BERTs load `model.text.bert` weights when `model.text.pretrained`
    (ALBEF: bert-base-uncased, decoder = its first layers)."""
    tcfg = model_cfg.text
    parts = build_encoders(model_cfg)
    dec_config = decoder_config(parts.text.config)
    overrides = {**tcfg.config_overrides, "num_hidden_layers": dec_config.num_hidden_layers}
    text_decoder = AnswerDecoder.from_pretrained(
        tcfg.bert, fusion_layer=0, encoder_width=dec_config.encoder_width,
        config_overrides=overrides, load_weights=tcfg.pretrained, attention=tcfg.attention,
    )
    text_decoder.set_grad_checkpointing(tcfg.grad_checkpointing)
    return VQAModel(parts.vision, parts.text, text_decoder, parts.tokenizer.pad_token_id,
                    distill=model_cfg.distill, momentum=model_cfg.momentum)


def compile_blocks(model: ALBEF, **compile_kwargs: Any) -> None:
    """Regional torch.compile: every ViT block and BERT layer (online and momentum) compiled in
    place, so state-dict keys, hooks and the Python control flow around them stay as they are."""
    for encoder in (model.visual_encoder, model.visual_encoder_m):
        for block in encoder.blocks:
            block.compile(**compile_kwargs)
    for encoder in (model.text_encoder, model.text_encoder_m):
        for layer in encoder.bert.encoder.layer:
            layer.compile(**compile_kwargs)
