"""Model construction from the config (`build_model`)."""

from __future__ import annotations

from typing import Any

from albef.config import ConfigError
from albef.models.albef import ALBEF, LOSS_TERMS, TokenIds
from albef.models.bert import TextEncoder, bert_config, load_tokenizer
from albef.models.vision import build_vision_encoder

__all__ = ["ALBEF", "TextEncoder", "TokenIds", "build_model", "build_tokenizer", "checked_tokenizer", "build_vision_encoder", "compile_blocks"]


def build_tokenizer(cfg: Any):
    """The tokenizer of `model.text.tokenizer`, or of `model.text.bert` when that is unset (no
    remote code: `load_tokenizer`)."""
    return load_tokenizer(cfg.model.text.tokenizer or cfg.model.text.bert)


def checked_tokenizer(cfg: Any):
    """`build_tokenizer(cfg)`, after checking, before any model is built, that its vocabulary has
    the size of the BERT config's `vocab_size`; one-line ConfigError otherwise."""
    tcfg = cfg.model.text
    tokenizer = build_tokenizer(cfg)
    vocab_size = bert_config(tcfg.bert, tcfg.fusion_layer, 0, tcfg.config_overrides).vocab_size
    if len(tokenizer) != vocab_size:
        name = tcfg.tokenizer or tcfg.bert
        raise ConfigError(f"model.text.tokenizer: tokenizer {str(name)!r} has {len(tokenizer)} tokens but BERT config "
                          f"{str(tcfg.bert)!r} has vocab_size={vocab_size}; use a matching model.text.tokenizer "
                          "(its vocab.txt) or config.json")
    return tokenizer


def build_model(cfg: Any) -> ALBEF:
    """ALBEF from `cfg.model` and `cfg.loss`: timm ViT + BERT text/fusion encoder + momentum copies."""
    mcfg, tcfg = cfg.model, cfg.model.text
    tokenizer = checked_tokenizer(cfg)

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


def compile_blocks(model: ALBEF, **compile_kwargs: Any) -> None:
    """Regional torch.compile: every ViT block and BERT layer (online and momentum) compiled in
    place, so state-dict keys, hooks and the Python control flow around them stay as they are."""
    for encoder in (model.visual_encoder, model.visual_encoder_m):
        for block in encoder.blocks:
            block.compile(**compile_kwargs)
    for encoder in (model.text_encoder, model.text_encoder_m):
        for layer in encoder.bert.encoder.layer:
            layer.compile(**compile_kwargs)
