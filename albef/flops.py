"""Analytic FLOPs of one ALBEF pretraining step, as `ALBEF.forward` computes it.

Counts matrix multiplications only (2 FLOPs per multiply-add): linear layers, attention
products, the patch embedding, the MLM decoder and the ITC similarities. Norms, softmaxes,
activations and gathers are left out (a few % at most). The online encoders run forward and
backward (backward = twice the forward, minus the input gradient of the patch embedding, whose
input needs none); the momentum encoders run forward only.
Checked against `torch.utils.flop_counter.FlopCounterMode` in tests/test_benchmark.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Shapes:
    """The sizes the FLOPs depend on, read from a built model."""

    vision_width: int
    vision_depth: int
    vision_mlp: int  # hidden width of the ViT MLP
    image_tokens: int  # patches + prefix tokens
    patches: int
    patch_in: int  # 3 * patch_size**2
    text_width: int
    text_layers: int  # layers below fusion_layer
    fusion_layers: int
    intermediate: int
    vocab: int
    embed_dim: int
    queue_size: int

    @classmethod
    def of(cls, model: nn.Module) -> Shapes:
        vit, bert = model.visual_encoder, model.text_encoder.config
        patch = vit.patch_embed.proj
        return cls(
            vision_width=vit.embed_dim,
            vision_depth=len(vit.blocks),
            vision_mlp=vit.blocks[0].mlp.fc1.out_features,
            image_tokens=vit.patch_embed.num_patches + vit.num_prefix_tokens,
            patches=vit.patch_embed.num_patches,
            patch_in=patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1],
            text_width=bert.hidden_size,
            text_layers=bert.fusion_layer,
            fusion_layers=bert.num_hidden_layers - bert.fusion_layer,
            intermediate=bert.intermediate_size,
            vocab=bert.vocab_size,
            embed_dim=model.vision_proj.out_features,
            queue_size=model.image_queue.shape[1],
        )


def vit_flops(s: Shapes, images: int) -> int:
    """Forward FLOPs of the ViT over `images` images."""
    n, w = s.image_tokens, s.vision_width
    block = 2 * n * (4 * w * w + 2 * w * s.vision_mlp) + 4 * n * n * w
    return images * (2 * s.patches * s.patch_in * w + s.vision_depth * block)


def _text_layer(s: Shapes, length: int, rows: int | None = None) -> int:
    """One self-attention + FFN layer over a text of `length` (all rows, or `rows` query rows)."""
    h, q = s.text_width, length if rows is None else rows
    return 2 * length * 2 * h * h + 2 * q * (2 * h * h + 2 * h * s.intermediate) + 4 * q * length * h


def _cross(s: Shapes, queries: int) -> int:
    """Cross-attention of `queries` text rows to one image, keys/values excluded."""
    h = s.text_width
    return 2 * queries * 2 * h * h + 4 * queries * s.image_tokens * h


def image_kv_flops(s: Shapes, images: int) -> int:
    """Cross-attention keys and values of `images` images in every fusion layer."""
    return images * s.fusion_layers * 2 * s.image_tokens * s.vision_width * s.text_width * 2


def fusion_flops(s: Shapes, texts: int, length: int, head_rows: int) -> int:
    """Fusion layers over `texts` texts (K/V of the images excluded); the last layer computes only
    `head_rows` query rows in total."""
    full = texts * (s.fusion_layers - 1) * (_text_layer(s, length) + _cross(s, length))
    last = texts * 2 * length * 2 * s.text_width ** 2  # keys/values of every position
    last += head_rows * ((_text_layer(s, length, 1) - 2 * length * 2 * s.text_width ** 2) + _cross(s, 1))
    return full + last


def mlm_head_flops(s: Shapes, masked: int) -> int:
    h = s.text_width
    return masked * (2 * h * h + 2 * h * s.vocab)


def step_flops(model: nn.Module, batch_size: int, length: int, masked: int) -> dict[str, int]:
    """FLOPs of one training step with ITC, ITM and MLM on: `batch_size` pairs, texts padded to
    `length` tokens, `masked` MLM positions in the batch. Returns the forward FLOPs of the online
    and momentum models and the step total (online x 3 + momentum)."""
    s = Shapes.of(model)
    b, d, bank = batch_size, s.embed_dim, batch_size + s.queue_size
    proj = 2 * b * (s.vision_width + s.text_width) * d
    itc = 2 * 2 * b * d * bank  # i2t and t2i logits
    online = (
        vit_flops(s, b)
        + 2 * b * s.text_layers * _text_layer(s, length)  # captions and masked captions
        + image_kv_flops(s, b)
        + fusion_flops(s, 4 * b, length, 3 * b + masked)  # 3B ITM rows + B MLM rows
        + mlm_head_flops(s, masked) + 2 * 3 * b * s.text_width * 2  # MLM and ITM heads
        + proj + itc
    )
    momentum = (
        vit_flops(s, b)
        + 2 * b * s.text_layers * _text_layer(s, length)
        + image_kv_flops(s, b)
        + fusion_flops(s, b, length, masked)
        + mlm_head_flops(s, masked)
        + proj + itc + 2 * 2 * b * d * b  # targets, ITM negative sampling
    )
    patch_input_grad = 2 * b * s.patches * s.patch_in * s.vision_width
    return {"online_forward": online, "momentum_forward": momentum,
            "step": 3 * online - patch_input_grad + momentum}
