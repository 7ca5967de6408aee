"""Model construction from the config (`build_model`)."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from albef.models.albef import ALBEF, LOSS_TERMS, TokenIds
from albef.models.bert import TextEncoder
from albef.models.vision import build_vision_encoder

__all__ = ["ALBEF", "TextEncoder", "TokenIds", "build_model", "build_tokenizer", "build_vision_encoder", "compile_blocks"]


def build_tokenizer(cfg: Any):
    """The tokenizer of `model.text.tokenizer`, or of `model.text.bert` when that is unset."""
    return AutoTokenizer.from_pretrained(cfg.model.text.tokenizer or cfg.model.text.bert)


def build_model(cfg: Any) -> ALBEF:
    """ALBEF from `cfg.model` and `cfg.loss`: timm ViT + BERT text/fusion encoder + momentum copies."""
    mcfg, tcfg = cfg.model, cfg.model.text
    tokenizer_name = tcfg.tokenizer or tcfg.bert
    tokenizer = build_tokenizer(cfg)

    visual_encoder = build_vision_encoder(mcfg.vision)
    text_encoder = TextEncoder.from_pretrained(
        tcfg.bert,
        fusion_layer=tcfg.fusion_layer,
        encoder_width=visual_encoder.embed_dim,
        config_overrides=tcfg.config_overrides,
        load_weights=tcfg.pretrained,
        attention=tcfg.attention,
        mlm_head=cfg.loss.weights.mlm > 0,  # fine-tuning models (MLM weight 0) have no MLM head
    )
    vocab_size = text_encoder.config.vocab_size
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but BERT config {tcfg.bert!r} has "
            f"vocab_size={vocab_size}; use a matching model.text.tokenizer or config"
        )
    text_encoder.set_grad_checkpointing(tcfg.grad_checkpointing)

    model = ALBEF(
        visual_encoder,
        text_encoder,
        TokenIds(
            pad=tokenizer.pad_token_id,
            cls=tokenizer.cls_token_id,
            sep=tokenizer.sep_token_id,
            mask=tokenizer.mask_token_id,
        ),
        embed_dim=mcfg.embed_dim,
        temp=mcfg.temp,
        momentum=mcfg.momentum,
        queue_size=mcfg.queue_size,
        mlm_probability=cfg.loss.mlm_probability,
        loss_weights={k: getattr(cfg.loss.weights, k) for k in LOSS_TERMS},
        itc_kind=cfg.loss.itc,
        itc_gather_batch=cfg.loss.itc_gather_batch,
        itm_negatives=cfg.loss.itm_negatives,
        mlm_mask_sep=cfg.loss.mlm_mask_sep,
    )
    if cfg.train.compile:
        compile_blocks(model)
    return model


def compile_blocks(model: ALBEF) -> None:
    """Regional torch.compile: every ViT block and BERT layer (online and momentum) compiled in
    place, so state-dict keys, hooks and the Python control flow around them stay as they are."""
    for encoder in (model.visual_encoder, model.visual_encoder_m):
        for block in encoder.blocks:
            block.compile(dynamic=None)
    for encoder in (model.text_encoder, model.text_encoder_m):
        for layer in encoder.bert.encoder.layer:
            layer.compile(dynamic=None)
