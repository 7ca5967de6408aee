"""The ViT image encoder (timm), positional-embedding resampling and local checkpoint init."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from albef.checkpoint import load_checkpoint_file, unwrap_model_state
from albef.weights import CheckpointError, LoadReport, WeightAdapter

_ARCH_OVERRIDES = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")


def build_vision_encoder(vcfg: Any) -> VisionTransformer:
    """timm ViT returning all tokens [B, prefix + N, W] (no pooling, no classifier).

    `vcfg` is the `model.vision` config section (arch, image_size, pretrained, checkpoint,
    embed_dim/depth/num_heads/patch_size/mlp_ratio overrides, drop_path_rate, grad_checkpointing).
    """
    overrides = {k: getattr(vcfg, k) for k in _ARCH_OVERRIDES if getattr(vcfg, k) is not None}
    pretrained = vcfg.pretrained and not vcfg.checkpoint  # a local file replaces the hub weights
    try:
        model = timm.create_model(
            vcfg.arch,
            pretrained=pretrained,
            img_size=vcfg.image_size,
            num_classes=0,
            global_pool="",
            drop_path_rate=vcfg.drop_path_rate,
            **overrides,
        )
    except (OSError, RuntimeError) as err:  # no network / no cached weights / incompatible weights
        if not pretrained:
            raise
        raise CheckpointError(
            f"model.vision.pretrained: cannot get timm's pretrained weights for {vcfg.arch!r} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no details'}); "
            "set model.vision.checkpoint to a local file (e.g. ALBEF's deit_base_patch16_224-b5f2ef4d.pth)"
        ) from err
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model.vision.arch={vcfg.arch!r} is not a timm VisionTransformer; use a vit_/deit_ model")
    if vcfg.checkpoint:
        load_vision_checkpoint(model, vcfg.checkpoint)
    if vcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


_WRAPPER_PREFIXES = ("module.", "model.")  # DDP / EMA / trainer wrappers around a plain ViT state dict
_ALBEF_PREFIX = "visual_encoder."  # the online ViT inside an ALBEF checkpoint
_UNUSED = ("head", "head_dist", "fc_norm", "pre_logits")  # classifier parts a token encoder has no use for


def vision_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The ViT's keys of a DeiT / timm / ALBEF state dict, wrapper prefixes removed.

    Returns (state, other file keys that are not the ViT's: the rest of an ALBEF checkpoint)."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith(_ALBEF_PREFIX) for k in state):
        others = [k for k in state if not k.startswith(_ALBEF_PREFIX)]
        state = {k[len(_ALBEF_PREFIX):]: v for k, v in state.items() if k.startswith(_ALBEF_PREFIX)}
        return state, others
    return state, []


def load_vision_checkpoint(model: VisionTransformer, path: str | Path) -> LoadReport:
    """Initialise `model` from a local DeiT / timm / ALBEF file completely, or raise
    CheckpointError naming the keys; `pos_embed` is resampled to the model's patch grid."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.vision.checkpoint: {str(path)!r} does not exist; fix the path or set it to null")
    report = VIT_ADAPTER.load(model, unwrap_model_state(load_checkpoint_file(path), path), str(path))
    report.print()
    return report


class ViTAdapter(WeightAdapter):
    """A DeiT / timm / ALBEF state dict into a plain ViT token encoder (`vision_state_dict`);
    unused: the classifier parts; `pos_embed` is resampled to the model's patch grid."""

    def adapt(self, model: VisionTransformer, state: dict[str, Tensor], source: str
              ) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
        state, others = vision_state_dict(state)
        notes = [f"took the {len(state)} visual_encoder.* tensors of an ALBEF checkpoint; "
                 f"{len(others)} other tensors ignored"] if others else []
        return state, list(self.unused), list(self.new), notes


VIT_ADAPTER = ViTAdapter("vit", unused=_UNUSED)
