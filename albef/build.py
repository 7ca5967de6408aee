"""A whole `Config` bound to the model it describes: the one place where settings outside
`cfg.model` reach a model, as the model's own arguments (`cfg.loss` -> ALBEF's loss
arguments, `cfg.train.compile` -> `compile_blocks`). The models themselves (albef/models/factory.py)
read `cfg.model` only.
"""
from __future__ import annotations

import difflib
from typing import Any

import timm

from albef.config import Config, ConfigError, config_error
from albef.models import checked_tokenizer
from albef.models.bert import bert_config
from albef.models.albef import ALBEF, LOSS_TERMS
from albef.models.factory import build_albef, compile_blocks

__all__ = ["build_model", "albef_loss_arguments"]


def albef_loss_arguments(loss_cfg: Any) -> dict[str, Any]:
    """ALBEF's loss arguments (`build_albef`) of a `loss` config section."""
    return dict(
        loss_weights={k: getattr(loss_cfg.weights, k) for k in LOSS_TERMS},
        mlm_probability=loss_cfg.mlm_probability,
        itc_kind=loss_cfg.itc,
        itc_gather_batch=loss_cfg.itc_gather_batch,
        itm_negatives=loss_cfg.itm_negatives,
        mlm_mask_sep=loss_cfg.mlm_mask_sep,
    )


def build_model(cfg: Config) -> ALBEF:
    """ALBEF of `cfg.model` with the loss settings of `cfg.loss` (timm ViT + BERT text/fusion
    encoder + momentum copies), its blocks compiled when `train.compile`."""
    model = build_albef(cfg.model, **albef_loss_arguments(cfg.loss))
    if cfg.train.compile:
        compile_blocks(model)
    return model



def check_model_config(cfg: Config) -> None:
    """Model settings that need timm or the BERT config to check: a known timm architecture, a
    readable BERT config, fusion_layer within its layers, a hidden size the heads divide."""
    vision, text = cfg.model.vision, cfg.model.text
    if not timm.is_model(vision.arch):
        close = difflib.get_close_matches(vision.arch, timm.list_models(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see timm.list_models('vit_*')"
        raise config_error(cfg, "model.vision.arch", f"unknown timm model '{vision.arch}' ({hint})")
    try:
        bert = bert_config(text.bert, text.fusion_layer, 0, text.config_overrides)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise config_error(cfg, "model.text.bert", f"cannot read a BERT config from '{text.bert}' "
                            f"({' '.join(str(err).split())[:200]})") from None
    if text.fusion_layer > bert.num_hidden_layers:
        raise config_error(cfg, "model.text.fusion_layer", f"must be <= the BERT's {bert.num_hidden_layers} "
                            f"layers (got {text.fusion_layer}); lower it or raise "
                            "model.text.config_overrides.num_hidden_layers")
    if bert.hidden_size % bert.num_attention_heads:
        key = "hidden_size" if "hidden_size" in text.config_overrides else "num_attention_heads"
        raise config_error(cfg, f"model.text.config_overrides.{key}",
                            f"hidden_size {bert.hidden_size} is not divisible by num_attention_heads "
                            f"{bert.num_attention_heads}")
    try:
        checked_tokenizer(cfg.model)  # its vocabulary against the config's vocab_size, before any model is built
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        key = "model.text.tokenizer" if text.tokenizer else "model.text.bert"
        raise config_error(cfg, key, f"cannot load a tokenizer from '{text.tokenizer or text.bert}' "
                            f"({' '.join(str(err).split())[:200]})") from None
