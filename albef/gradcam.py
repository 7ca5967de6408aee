"""Grad-CAM of ALBEF's localisation, in its two modes (`Grounding.py --gradcam_mode itm | itc`).

`itm` (the default): the ITM score through a fusion layer's cross-attention. ALBEF
(`Grounding.py` val, `visualization.ipynb`) localises an expression in an image by:

1. running the text encoder in multimodal mode (all layers, from token ids) on the image tokens;
2. taking the ITM head's *positive logit* of the CLS state, summed over the batch;
3. reading the cross-attention probabilities [B, heads, L, 1 + N] of BERT layer `block_num`
   (an absolute layer index, so 8 = the third fusion layer of BERT-base) and the gradient of
   that score with respect to them;
4. dropping the image CLS column, masking text padding rows, clamping the gradient at 0 and
   multiplying it with the attention map, then averaging over heads: one map per text token;
5. for grounding, averaging those token maps over all L text positions (padding rows count as
   zero, as in the original).

`itc`: the ITC similarity through the self-attention of ViT block `block_num` (`itc_gradcam`):
the image and text features (CLS states, projected and normalised) give sim = i . t / temp per
pair; the gradient of its sum with respect to the block's attention probabilities [B, heads,
1 + N, 1 + N] is clamped at 0 and multiplied with them, the CLS query row over the patch keys is
kept and averaged over heads. There is one map per expression (no per-token maps).

Works on any model with our layout: `visual_encoder` (timm ViT), `text_encoder.bert`
(albef.models.bert.BertModel), `itm_head`, `vision_proj` / `text_proj` / `temp` -- the
pretraining ALBEF and the retrieval / grounding model alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


GRADCAM_MODES = ("itm", "itc")


def check_block_num(model: nn.Module, block_num: int, mode: str = "itm") -> None:
    """ValueError (one line) unless `block_num` is a fusion layer of `model`'s text encoder
    (`itm`) or a block of its ViT (`itc`)."""
    if mode not in GRADCAM_MODES:
        raise ValueError(f"grounding.gradcam_mode={mode!r}: must be one of {GRADCAM_MODES}")
    if mode == "itc":
        depth = len(model.visual_encoder.blocks)
        if not 0 <= block_num < depth:
            raise ValueError(f"grounding.block_num={block_num} is not a ViT block: with gradcam_mode itc it names "
                             f"one of the image encoder's blocks 0..{depth - 1}")
        return
    config = model.text_encoder.bert.config
    if not config.fusion_layer <= block_num < config.num_hidden_layers:
        raise ValueError(
            f"grounding.block_num={block_num} is not a fusion layer: the text encoder's cross-attention "
            f"layers are {config.fusion_layer}..{config.num_hidden_layers - 1}; pick one of them"
        )


def patch_grid(visual_encoder: nn.Module) -> tuple[int, tuple[int, int]]:
    """(number of prefix tokens, (rows, cols) of the patch grid) of a timm ViT."""
    return int(getattr(visual_encoder, "num_prefix_tokens", 1)), tuple(visual_encoder.patch_embed.grid_size)


def gradcam_token_maps(
    model: nn.Module, images: Tensor, input_ids: Tensor, attention_mask: Tensor, block_num: int
) -> tuple[Tensor, Tensor]:
    """Per-token Grad-CAM maps [B, L, rows, cols] (zero on padding) and the ITM logits [B, 2].

    `model` should be in eval mode (ALBEF runs it so: no dropout). Gradients are taken with
    respect to the attention maps only; parameter `.grad`s are left untouched.
    """
    check_block_num(model, block_num)
    bert = model.text_encoder.bert
    prefix, (rows, cols) = patch_grid(model.visual_encoder)
    with torch.enable_grad():
        with torch.no_grad():
            image_embeds = model.visual_encoder(images)
        # A leaf that needs grad makes the maps part of the graph even when the weights are frozen;
        # the backward pass stops at it, so the ViT is never differentiated.
        image_embeds = image_embeds.detach().requires_grad_(True)
        hidden, maps = bert(input_ids, attention_mask, image_embeds, mode="multimodal", output_attentions=True)
        logits = model.itm_head(hidden[:, 0])
        attention = maps[block_num - bert.config.fusion_layer]
        (grads,) = torch.autograd.grad(logits[:, 1].sum(), attention)
    batch, heads, length, _ = attention.shape
    text_mask = attention_mask.to(attention.dtype).view(batch, 1, length, 1, 1)
    cams = attention.detach()[..., prefix:].reshape(batch, heads, length, rows, cols) * text_mask
    grads = grads[..., prefix:].clamp(min=0).reshape(batch, heads, length, rows, cols) * text_mask
    return (cams * grads).mean(dim=1), logits.detach()


def itc_gradcam(
    model: nn.Module, images: Tensor, input_ids: Tensor, attention_mask: Tensor, block_num: int
) -> tuple[Tensor, Tensor]:
    """ALBEF's `itc` map [B, rows, cols] (see the module docstring) and the pairs' ITC
    similarities sim [B] (i . t / temp). Parameter `.grad`s are left untouched."""
    check_block_num(model, block_num, "itc")
    prefix, (rows, cols) = patch_grid(model.visual_encoder)
    attn = model.visual_encoder.blocks[block_num].attn
    maps: list[Tensor] = []
    # timm's explicit attention path: its attn_drop sees the probabilities (identity in eval mode)
    hook = attn.attn_drop.register_forward_hook(lambda module, args, out: maps.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.enable_grad():
            # images that need grad put the maps in the graph even when the weights are frozen
            image_embeds = model.visual_encoder(images.detach().requires_grad_(True))
            image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
            text_embeds = model.text_encoder.bert(input_ids, attention_mask, mode="text")
            text_feat = F.normalize(model.text_proj(text_embeds[:, 0]).float(), dim=-1)
            sim = (image_feat * text_feat).sum(dim=-1) / model.temp
            (grads,) = torch.autograd.grad(sim.sum(), maps[0])
    finally:
        attn.fused_attn = fused
        hook.remove()
    batch = len(images)
    cam = maps[0].detach()[:, :, 0, prefix:].reshape(batch, -1, rows, cols)
    grad = grads[:, :, 0, prefix:].reshape(batch, -1, rows, cols).clamp(min=0)
    return (cam * grad).mean(dim=1), sim.detach()


def gradcam(model: nn.Module, images: Tensor, input_ids: Tensor, attention_mask: Tensor, block_num: int,
            mode: str = "itm") -> Tensor:
    """ALBEF's grounding map [B, rows, cols]: `itm`, the per-token maps averaged over all text
    positions; `itc`, `itc_gradcam`."""
    if mode == "itc":
        return itc_gradcam(model, images, input_ids, attention_mask, block_num)[0]
    return gradcam_token_maps(model, images, input_ids, attention_mask, block_num)[0].mean(dim=1)


def upsample_map(cam: Tensor, height: int, width: int) -> Tensor:
    """A [rows, cols] map resized to [height, width] bicubically (ALBEF's `grounding_eval`)."""
    return F.interpolate(cam[None, None].float(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]
