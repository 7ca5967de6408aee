"""The ViT image encoder (timm), positional-embedding resampling and local checkpoint init."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from albef.checkpoint import load_checkpoint_file, resample_pos_embed

logger = logging.getLogger(__name__)

_ARCH_OVERRIDES = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")
_HEAD_PREFIXES = ("head.", "head_dist.")


def build_vision_encoder(vcfg: Any) -> VisionTransformer:
    """timm ViT returning all tokens [B, prefix + N, W] (no pooling, no classifier).

    `vcfg` is the `model.vision` config section (arch, image_size, pretrained, checkpoint,
    embed_dim/depth/num_heads/patch_size/mlp_ratio overrides, drop_path_rate, grad_checkpointing).
    """
    overrides = {k: getattr(vcfg, k) for k in _ARCH_OVERRIDES if getattr(vcfg, k) is not None}
    model = timm.create_model(
        vcfg.arch,
        pretrained=vcfg.pretrained,
        img_size=vcfg.image_size,
        num_classes=0,
        global_pool="",
        drop_path_rate=vcfg.drop_path_rate,
        **overrides,
    )
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model.vision.arch={vcfg.arch!r} is not a timm VisionTransformer; use a vit_/deit_ model")
    if vcfg.checkpoint:
        load_vision_checkpoint(model, vcfg.checkpoint)
    if vcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (or {{'model': ...}}), got {type(obj).__name__}")
    prefix = "visual_encoder."
    if any(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    return {k: v for k, v in obj.items() if not k.startswith(_HEAD_PREFIXES)}


def load_vision_checkpoint(model: VisionTransformer, path: str | Path) -> None:
    """Initialise `model` from a local DeiT / timm / ALBEF file, resampling pos_embed if needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.vision.checkpoint={str(path)!r} does not exist; fix the path or set it to null")
    state_dict = _unwrap_state_dict(load_checkpoint_file(path), path)
    if "pos_embed" in state_dict:
        grid = tuple(model.patch_embed.grid_size)
        state_dict["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], grid, model.num_prefix_tokens)
    own = model.state_dict()
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}; "
                "check model.vision.arch and its overrides"
            )
    result = model.load_state_dict(state_dict, strict=False)
    logger.info("loaded vision encoder from %s", path)
    if result.missing_keys:
        logger.warning("vision checkpoint %s: missing keys %s", path, result.missing_keys)
    if result.unexpected_keys:
        logger.warning("vision checkpoint %s: unexpected keys %s", path, result.unexpected_keys)
