"""Grad-CAM on the ITM score through a fusion layer's cross-attention (ALBEF's localisation).

ALBEF (`Grounding.py` val, `visualization.ipynb`) localises an expression in an image by:

1. running the text encoder in multimodal mode (all layers, from token ids) on the image tokens;
2. taking the ITM head's *positive logit* of the CLS state, summed over the batch;
3. reading the cross-attention probabilities [B, heads, L, 1 + N] of BERT layer `block_num`
   (an absolute layer index, so 8 = the third fusion layer of BERT-base) and the gradient of
   that score with respect to them;
4. dropping the image CLS column, masking text padding rows, clamping the gradient at 0 and
   multiplying it with the attention map, then averaging over heads: one map per text token;
5. for grounding, averaging those token maps over all L text positions (padding rows count as
   zero, as in the original).

Works on any model with our layout: `visual_encoder` (timm ViT), `text_encoder.bert`
(albef.models.bert.BertModel) and `itm_head` -- the pretraining ALBEF and the retrieval /
grounding model alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_block_num(model: nn.Module, block_num: int) -> None:
    """ValueError (one line) unless `block_num` is a fusion layer of `model`'s text encoder."""
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


def gradcam(model: nn.Module, images: Tensor, input_ids: Tensor, attention_mask: Tensor, block_num: int) -> Tensor:
    """ALBEF's grounding map [B, rows, cols]: the per-token maps averaged over all text positions."""
    return gradcam_token_maps(model, images, input_ids, attention_mask, block_num)[0].mean(dim=1)


def upsample_map(cam: Tensor, height: int, width: int) -> Tensor:
    """A [rows, cols] map resized to [height, width] bicubically (ALBEF's `grounding_eval`)."""
    return F.interpolate(cam[None, None].float(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]
