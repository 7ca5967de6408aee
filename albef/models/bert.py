"""A compact BERT text / fusion encoder with ALBEF's module names (state-dict keys match HF BERT).

Layers below `fusion_layer` are a plain bidirectional BERT text encoder; layers from
`fusion_layer` on add cross-attention to image tokens (key/value width `encoder_width`).
Modes: `text` (text layers only), `fusion` (fusion layers on given text states),
`multimodal` (all layers from token ids).

Two optional shortcuts for training steps, both exact (tests/test_fast_paths.py):
- `kv_index`: `image_embeds` holds each image once and text row i reads image `kv_index[i]`;
  the cross-attention keys/values of each fusion layer are computed once per image instead of
  once per text row (or come precomputed as `image_kv`, from `BertModel.cross_attention_kv`);
- `output_rows` (batch index [R], position [R]): the last layer computes only these query rows
  (the rows a head reads, e.g. [CLS] for ITM, masked positions for MLM) and returns [R, H].

`image_embeds` may also be a list of images (NLVR2): fusion layer `i` then attends to image
`(i - fusion_layer) % len(list)`, as ALBEF's xbert.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.activations import ACT2FN
from transformers.utils import cached_file

from albef.checkpoint import load_checkpoint_file
from albef.config import ConfigError, read_json
from albef.models.ops import Dropout, TiedGradient, take_rows
from albef.weights import LoadReport, WeightAdapter

logger = logging.getLogger(__name__)

MODES = ("text", "fusion", "multimodal")
ATTENTIONS = ("sdpa", "eager")


KV = tuple[Tensor, Tensor]  # (keys, values) split into heads, [B, heads, L, head_dim] each


def _key_mask(mask: Tensor | None) -> Tensor | None:
    """[B, L] padding mask (1 = keep) -> boolean [B, 1, 1, L] for attention over keys."""
    return None if mask is None else mask.bool()[:, None, None, :]



def _image_key_masks(mask: Tensor | list[Tensor] | None) -> Tensor | list[Tensor] | None:
    """`_key_mask` of an image mask, or of each mask of a list of images."""
    return [_key_mask(m) for m in mask] if isinstance(mask, (list, tuple)) else _key_mask(mask)


def _layer_image(image_embeds, image_mask, index: int, fusion_layer: int):
    """(tokens, mask) of the image that layer `index` attends to: with a list of images, the
    fusion layers take them in turn (layer fusion_layer: image 0, the next: image 1, ...)."""
    if not isinstance(image_embeds, (list, tuple)):
        return image_embeds, image_mask
    k = (index - fusion_layer) % len(image_embeds)
    return image_embeds[k], None if image_mask is None else image_mask[k]


def cast_for_autocast(x: Tensor | None) -> Tensor | None:
    """`x` in the autocast dtype when autocast is on, so that each projection does not cast it again."""
    if x is None or not torch.is_autocast_enabled(x.device.type) or not x.is_floating_point():
        return x
    return x.to(torch.get_autocast_dtype(x.device.type))


def _cast_images(image_embeds: Tensor | list[Tensor] | None) -> Tensor | list[Tensor] | None:
    """`cast_for_autocast` of the image tokens, or of each image of a list."""
    if isinstance(image_embeds, (list, tuple)):
        return [cast_for_autocast(x) for x in image_embeds]
    return cast_for_autocast(image_embeds)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, tied_grad: TiedGradient | None = None) -> Tensor:
        """`tied_grad`: the word embeddings' gradient joins the tied MLM decoder's (ops.TiedGradient)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if tied_grad is None:
            words = self.word_embeddings(input_ids)
        else:
            words = tied_grad.embedding(input_ids, self.word_embeddings.weight, self.word_embeddings.padding_idx)
        x = words + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int, attention: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout = Dropout(config.attention_probs_dropout_prob)
        self.attention = attention

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def kv_heads(self, context: Tensor) -> KV:
        """Keys and values of `context` [B, Lk, W], split into heads."""
        return self._heads(self.key(context)), self._heads(self.value(context))

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None,
        context: Tensor | None = None,
        need_weights: bool = False,
        kv: KV | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from `hidden` to `context` (itself when None); `mask` is boolean [B, 1, 1, Lk].

        `kv`: precomputed `kv_heads` of the context (one per row of `hidden`), used instead."""
        if kv is None:
            kv = self.kv_heads(hidden if context is None else context)
        q, (k, v) = self._heads(self.query(hidden)), kv
        probs = None
        # CPU training with attention dropout: the explicit path, whose dropout is ops.dropout
        # (SDPA would take its math path there anyway, with torch's slower CPU Bernoulli)
        cpu_dropout = (self.training and self.dropout.p > 0 and q.device.type == "cpu"
                       and not torch.compiler.is_compiling())
        if self.attention == "eager" or need_weights or cpu_dropout:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            out = self.dropout(probs) @ v
        else:
            dropout_p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return out.transpose(1, 2).flatten(2), probs


class BertSelfOutput(nn.Module):
    """Projection + dropout + residual LayerNorm (also used after the feed-forward block)."""

    def __init__(self, config: BertConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int, attention: str):
        super().__init__()
        self.self = BertSelfAttention(config, kv_width, attention)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None,
        context: Tensor | None = None,
        need_weights: bool = False,
        kv: KV | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        out, probs = self.self(hidden, mask, context, need_weights, kv)
        return self.output(out, hidden), probs


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, cross_attention: bool, attention: str):
        super().__init__()
        self.attention = BertAttention(config, config.hidden_size, attention)
        self.crossattention = BertAttention(config, config.encoder_width, attention) if cross_attention else None
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        need_weights: bool = False,
        image_kv: KV | None = None,
        kv_index: Tensor | None = None,
        rows: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """[B, L, H] -> [B, L, H]; with `rows` = (batch index [R], position [R]) only those query
        rows are computed (keys and values still come from every position) -> [R, H].

        With `kv_index`, `image_embeds` (or `image_kv`, this layer's `cross_attention_kv`) holds
        each image once and text row i reads image `kv_index[i]`: the keys and values are
        computed once per image, here inside the layer (so that FSDP has gathered its weights)."""
        self_kv = None
        if rows is not None:
            batch, position = rows
            self_kv = tuple(take_rows(t, batch) for t in self.attention.self.kv_heads(hidden))
            hidden = take_rows(hidden.flatten(0, 1), batch * hidden.shape[1] + position)[:, None]
            mask, image_mask = take_rows(mask, batch), take_rows(image_mask, batch)
            kv_index = batch if kv_index is None else kv_index[batch]
        hidden, _ = self.attention(hidden, mask, kv=self_kv)
        probs = None
        if self.crossattention is not None:
            if image_embeds is None and image_kv is None:
                raise ValueError("fusion layers need image_embeds")
            if kv_index is not None or image_kv is not None:
                if image_kv is None:
                    image_kv = self.crossattention.self.kv_heads(image_embeds)
                image_kv = tuple(take_rows(t, kv_index) for t in image_kv)
            hidden, probs = self.crossattention(hidden, image_mask, image_embeds, need_weights, image_kv)
        hidden = self.output(self.intermediate(hidden), hidden)
        return (hidden if rows is None else hidden[:, 0]), probs


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, attention: str):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, i >= config.fusion_layer, attention) for i in range(config.num_hidden_layers)
        )
        self.fusion_layer = config.fusion_layer
        self.grad_checkpointing = False

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None,
        layers: slice,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        output_attentions: bool = False,
        image_kv: list[KV] | None = None,
        kv_index: Tensor | None = None,
        output_rows: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Run `self.layer[layers]`; returns the hidden states and the cross-attention maps.

        `image_kv` holds one entry per fusion layer; `output_rows` applies to the last layer run."""
        attentions = []
        run = list(range(len(self.layer)))[layers]
        for n, i in enumerate(run):
            layer = self.layer[i]
            kv = None if image_kv is None or layer.crossattention is None else image_kv[i - self.fusion_layer]
            rows = output_rows if n == len(run) - 1 else None
            images = _layer_image(image_embeds, image_mask, i, self.fusion_layer)
            args = (hidden, mask, *images, output_attentions, kv, kv_index, rows)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden, probs = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden, probs = layer(*args)
            if probs is not None:
                attentions.append(probs)
        return hidden, attentions


class BertModel(nn.Module):
    """BERT without pooler; `forward` selects the layers by `mode`."""

    def __init__(self, config: BertConfig, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"model.text.attention must be one of {ATTENTIONS}, got {attention!r}")
        if not 0 <= config.fusion_layer <= config.num_hidden_layers:
            raise ValueError(
                f"model.text.fusion_layer={config.fusion_layer} must lie in [0, {config.num_hidden_layers}] "
                "(num_hidden_layers of the BERT config)"
            )
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, attention)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        mode: str = "multimodal",
        text_embeds: Tensor | None = None,
        output_attentions: bool = False,
        image_kv: list[KV] | None = None,
        kv_index: Tensor | None = None,
        output_rows: tuple[Tensor, Tensor] | None = None,
        tied_grad: TiedGradient | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Hidden states [B, L, H]; with `output_attentions`, also the cross-attention maps
        [B, heads, L, N] of each fusion layer run (the last one is what Grad-CAM uses).

        `text`: `input_ids` through the text layers. `fusion`: `text_embeds` (text-mode output)
        through the fusion layers with the image. `multimodal`: `input_ids` through all layers.
        With `kv_index`, text row i reads image `kv_index[i]` of `image_embeds` (keys/values
        computed once per image), or of `image_kv` (`cross_attention_kv`, replacing `image_embeds`). `output_rows` (batch index [R], position [R]): the last layer
        computes only these rows and the result is [R, H] (attention maps [R, heads, 1, N]).
        `tied_grad`: see `BertEmbeddings.forward`.
        """
        fusion = self.config.fusion_layer
        if mode == "text":
            hidden, layers = self.embeddings(input_ids, tied_grad), slice(0, fusion)
        elif mode == "fusion":
            hidden, layers = text_embeds, slice(fusion, None)
        elif mode == "multimodal":
            hidden, layers = self.embeddings(input_ids, tied_grad), slice(None)
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        hidden, attentions = self.encoder(
            hidden, _key_mask(attention_mask), layers, _cast_images(image_embeds), _image_key_masks(image_mask),
            output_attentions, image_kv, kv_index, output_rows,
        )
        return (hidden, attentions) if output_attentions else hidden

    def cross_attention_kv(self, image_embeds: Tensor) -> list[KV]:
        """Cross-attention keys and values of `image_embeds` [B, N, W] for every fusion layer, to
        pass as `image_kv` to any number of text rows per image (the image tokens are cast once)."""
        image_embeds = cast_for_autocast(image_embeds)
        return [layer.crossattention.self.kv_heads(image_embeds) for layer in self.encoder.layer
                if layer.crossattention is not None]


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: Tensor, tied_grad: TiedGradient | None = None) -> Tensor:
        """Vocabulary logits; `tied_grad`: the decoder's weight gradient joins the word
        embeddings' (ops.TiedGradient; the same one passed to the text pass)."""
        x = self.transform(x)
        return self.decoder(x) if tied_grad is None else tied_grad.linear(x, self.decoder.weight, self.decoder.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class TextEncoder(nn.Module):
    """ALBEF's BertForMaskedLM: `bert` encoder + `cls` MLM head (decoder tied to word embeddings).

    `mlm_head=False` builds the encoder alone (`cls` is None), as ALBEF's fine-tuning models do.
    """

    def __init__(self, config: BertConfig, attention: str = "sdpa", mlm_head: bool = True):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, attention)
        self.cls = BertOnlyMLMHead(config) if mlm_head else None
        self.apply(self._init_weights)
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(std=self.config.initializer_range)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
        if isinstance(module, (nn.Linear, nn.LayerNorm, BertLMPredictionHead)) and module.bias is not None:
            module.bias.zero_()

    @property
    def tied_mlm_decoder(self) -> bool:
        """The MLM decoder shares its weight with the word embeddings (ALBEF's BertForMaskedLM)."""
        return self.cls is not None and \
            self.cls.predictions.decoder.weight is self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor, **kwargs: Any) -> Tensor:
        """Multimodal hidden states of (masked) token ids with the image."""
        return self.bert(input_ids, attention_mask, image_embeds, mode="multimodal", **kwargs)

    def mlm_logits(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """Vocabulary logits [M, V] at the M positions where the boolean mask `positions` is set."""
        return self.cls.predictions(hidden[positions])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.bert.encoder.grad_checkpointing = enable

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        fusion_layer: int,
        encoder_width: int,
        config_overrides: dict[str, Any] | None = None,
        load_weights: bool = True,
        attention: str = "sdpa",
        mlm_head: bool = True,
    ) -> TextEncoder:
        """Build from a HF BERT config (hub id or local dir), loading its weights when asked."""
        config = bert_config(name_or_dir, fusion_layer, encoder_width, config_overrides)
        model = cls(config, attention, mlm_head)
        if load_weights:
            model.load_bert_state_dict(read_bert_weights(name_or_dir), source=str(name_or_dir)).print()
        return model

    def load_bert_state_dict(self, state_dict: dict[str, Tensor], source: str = "BERT weights") -> LoadReport:
        """Load HF BertModel / BertForMaskedLM weights completely, or raise CheckpointError.

        Keys may carry the `bert.` prefix or not and use the legacy LayerNorm names `gamma` /
        `beta`. The only model keys allowed to be absent are the cross-attention layers that
        ALBEF adds from `fusion_layer` on; the only file keys left unused are the pooler, the
        next-sentence head and (for an encoder built without MLM head) the MLM head.
        """
        return BERT_ADAPTER.load(self, state_dict, source)


_LEGACY_LAYERNORM = re.compile(r"LayerNorm\.(gamma|beta)$")


class BertAdapter(WeightAdapter):
    """HF BertModel / BertForMaskedLM weights into a `TextEncoder`: keys with or without the
    `bert.` prefix, legacy LayerNorm names `gamma` / `beta`; new: the cross-attention layers ALBEF
    adds from `fusion_layer` on; unused: the pooler, the next-sentence head and (for an encoder
    built without MLM head) the MLM head."""

    def adapt(self, model: TextEncoder, state: dict[str, Tensor], source: str
              ) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
        renamed = {}
        for key, value in state.items():
            key = _LEGACY_LAYERNORM.sub(lambda m: f"LayerNorm.{'weight' if m[1] == 'gamma' else 'bias'}", key)
            renamed[key if key.startswith(("bert.", "cls.")) else f"bert.{key}"] = value
        fusion = model.config.fusion_layer
        new = [f"bert.encoder.layer.{i}.crossattention" for i in range(fusion, model.config.num_hidden_layers)]
        unused = list(self.unused) + ([] if model.cls is not None else ["cls"])
        return renamed, unused, new, []


BERT_ADAPTER = BertAdapter("bert", unused=("bert.pooler", "cls.seq_relationship"))


# The largest value we build a BERT with, per config field (bert-large: 30522 / 1024 / 24 / 16 /
# 4096 / 512 / 2): a downloaded config.json asking for more is refused before anything is allocated.
BERT_SIZE_LIMITS = {
    "vocab_size": 1_000_000, "hidden_size": 16_384, "num_hidden_layers": 128, "num_attention_heads": 256,
    "intermediate_size": 65_536, "max_position_embeddings": 65_536, "type_vocab_size": 1_024,
}
# Files of a model folder that transformers reads, and whose `auto_map` would make it import the
# folder's own Python code.
_MODEL_FOLDER_JSON = ("config.json", "tokenizer_config.json")


def check_model_folder(name_or_dir: str | Path) -> None:
    """Refuse, in one line (ConfigError), a BERT / tokenizer folder (local or in the hub cache)
    whose config.json or tokenizer_config.json is not a JSON object, or asks for custom code
    (`auto_map`): nothing from a model folder runs, and transformers is never left to ask on
    stdin. A folder that cannot be found is left to the loader that reports it."""
    for filename in _MODEL_FOLDER_JSON:
        try:
            path = cached_file(str(name_or_dir), filename, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            return
        if path is None:
            continue
        data = read_json(path, filename)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object (found a {type(data).__name__})")
        if "auto_map" in data:
            raise ConfigError(
                f"{path}: asks for custom code (auto_map: {', '.join(map(str, data['auto_map']))[:80]}); code from a "
                "model folder is never run: use a plain BERT folder (config.json of model_type 'bert' and vocab.txt)")


def check_bert_sizes(config: BertConfig, source: str) -> None:
    """Every size of `config` a positive integer within BERT_SIZE_LIMITS, else one-line ConfigError."""
    for key, limit in BERT_SIZE_LIMITS.items():
        value = getattr(config, key, None)
        if value is None and key == "intermediate_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ConfigError(f"{source}: {key} must be an integer in [1, {limit}] (got {value!r}); fix the model "
                              f"folder's config.json or set model.text.config_overrides.{key}")


def bert_config(
    name_or_dir: str | Path, fusion_layer: int, encoder_width: int, overrides: dict[str, Any] | None = None
) -> BertConfig:
    """`BertConfig.from_pretrained` plus overrides, with ALBEF's `fusion_layer` and `encoder_width`;
    the folder passes `check_model_folder` first and the sizes `check_bert_sizes` after."""
    check_model_folder(name_or_dir)
    config = BertConfig.from_pretrained(str(name_or_dir), trust_remote_code=False)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"BERT config override {key!r} is not a BertConfig attribute")
        setattr(config, key, value)
    check_bert_sizes(config, f"BERT config {str(name_or_dir)!r}")
    config.fusion_layer = fusion_layer
    config.encoder_width = encoder_width
    return config


def load_tokenizer(name_or_dir: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained` of a folder or hub id that passed `check_model_folder`,
    never with remote code."""
    from transformers import AutoTokenizer

    check_model_folder(name_or_dir)
    return AutoTokenizer.from_pretrained(str(name_or_dir), trust_remote_code=False)


def read_bert_weights(name_or_dir: str | Path) -> dict[str, Tensor]:
    """The state dict in model.safetensors (preferred) or pytorch_model.bin of a dir or hub id."""
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = cached_file(str(name_or_dir), filename, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        return load_checkpoint_file(path)
    raise FileNotFoundError(
        f"no model.safetensors or pytorch_model.bin for {str(name_or_dir)!r}; "
        "add the weights or set model.text.pretrained=false"
    )
