"""A whole `Config` bound to the model it describes: the one place where settings outside
`cfg.model` reach a model, as the model's own arguments (`cfg.loss` -> ALBEF's loss
arguments, `cfg.train.compile` -> `compile_blocks`). The models themselves (albef/models/factory.py)
read `cfg.model` only.
"""
from __future__ import annotations

from typing import Any

from albef.config import Config
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
