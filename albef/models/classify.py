"""Visual reasoning models: SNLI-VE and NLVR2 classifiers and NLVR2's text-assignment (TA)
pretraining model, with ALBEF's module names so released checkpoints load key for key.

* `Classifier` (ALBEF model_ve / model_nlvr): ViT + BERT text/fusion encoder, the fused [CLS]
  state through `cls_head` (Linear(H, H) -> ReLU -> Linear(H, classes)); momentum copies
  `visual_encoder_m`, `text_encoder_m`, `cls_head_m` when distilling.
  With `num_images=2` (NLVR2) the BERT has twice the fusion layers; they attend to image 0 and
  image 1 in turn, and each pair (F+2k, F+2k+1) shares its cross-attention key/value weights.
* `TextAssignment` (ALBEF model_pretrain_nlvr): for each text, two images are drawn from the
  batch; the text matches image 0, image 1, or neither (3 classes, `ta_head`).
* Initialisation rules (pure functions of state dicts, our key names, i.e. after
  `map_albef_keys`): `double_fusion_layers` (pretrain -> TA / NLVR2) and
  `with_momentum_copies` (TA -> NLVR2: the momentum encoders start from the loaded weights).
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig

from albef.losses import classification_distill_loss
from albef.models.momentum import MomentumModel, momentum_copy
from albef.weights import CheckpointError, WeightAdapter

TA_TEMP = 0.07  # ALBEF's TA forward divides by this literal, not by its `temp` parameter
TA_LABELS = ("image 0", "image 1", "neither")
# `...encoder.layer.N.rest` of a BERT (ours `text_encoder(_m).bert.encoder.layer.N`, HF `bert.encoder...`)
_LAYER_KEY = re.compile(r"^((?:[\w.]*\.)?encoder\.layer\.)(\d+)(\..+)$")


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """ALBEF's `cls_head`: Linear(width, width) -> ReLU -> Linear(width, classes) (keys .0 / .2)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def two_image_bert_config(config: BertConfig) -> BertConfig:
    """The NLVR2 / TA BERT config: the same text layers, every fusion layer twice (one per image).

    ALBEF hard-codes 18 = 6 text + 2 x 6 fusion layers for its 12-layer BERT.
    """
    config = copy.deepcopy(config)
    config.num_hidden_layers = config.fusion_layer + 2 * (config.num_hidden_layers - config.fusion_layer)
    return config


def share_cross_attention(bert: nn.Module) -> None:
    """Fusion layers F+2k and F+2k+1 use one cross-attention key and value (ALBEF's
    `share_cross_attention`): layer F+2k's parameters become layer F+2k+1's."""
    layers, fusion = bert.encoder.layer, bert.config.fusion_layer
    for i in range(fusion, len(layers) - 1, 2):
        first, second = layers[i].crossattention.self, layers[i + 1].crossattention.self
        for name in ("key", "value"):
            getattr(first, name).weight = getattr(second, name).weight
            getattr(first, name).bias = getattr(second, name).bias


class Classifier(MomentumModel):
    """SNLI-VE (`num_images=1`, 3 classes) or NLVR2 (`num_images=2`, 2 classes) classifier.

    `forward(images, input_ids, attention_mask)` gives the student's logits [B, classes];
    with `targets` it returns the training outputs (loss, loss_cls, logits), distilling from
    the momentum model's softmax when `distill`. `images` are [B, 3, H, W] for one image per
    text and [B, 2, 3, H, W] for two.
    """

    def __init__(
        self,
        visual_encoder: nn.Module,
        text_encoder: nn.Module,
        num_classes: int,
        num_images: int = 1,
        distill: bool = True,
        momentum: float = 0.995,
    ):
        super().__init__()
        if num_images not in (1, 2):
            raise ValueError(f"num_images must be 1 or 2, got {num_images}")
        self.num_images = num_images
        self.distill = distill
        self.momentum = momentum
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        if num_images == 2:
            share_cross_attention(text_encoder.bert)
        self.cls_head = classifier_head(text_encoder.config.hidden_size, num_classes)
        if distill:
            self.visual_encoder_m = momentum_copy(self.visual_encoder)
            self.text_encoder_m = momentum_copy(self.text_encoder)
            self.cls_head_m = momentum_copy(self.cls_head)

    def _logits(self, visual_encoder, text_encoder, cls_head, images, input_ids, attention_mask) -> Tensor:
        if self.num_images == 1:
            image_embeds = visual_encoder(images)
        else:  # one ViT pass over [image 0 of every sample; image 1 of every sample]
            image_embeds = list(visual_encoder(images.transpose(0, 1).flatten(0, 1)).chunk(2))
        hidden = text_encoder.bert(input_ids, attention_mask, image_embeds, mode="multimodal")
        return cls_head(hidden[:, 0])

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        targets: Tensor | None = None,
        alpha: float = 0.0,
    ) -> Tensor | dict[str, Tensor]:
        logits = self._logits(self.visual_encoder, self.text_encoder, self.cls_head, images, input_ids, attention_mask)
        if targets is None:
            return logits
        logits_m = None
        if self.distill:
            with torch.no_grad():
                logits_m = self.momentum_logits(images, input_ids, attention_mask)
        loss = classification_distill_loss(logits, targets, logits_m, alpha)
        return {"loss": loss, "loss_cls": loss.detach(), "logits": logits.detach()}

    @torch.no_grad()
    def momentum_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._logits(
            self.visual_encoder_m, self.text_encoder_m, self.cls_head_m, images, input_ids, attention_mask
        )



def assign_images(weights: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ALBEF's TA sampling: for text b, with probability 2/3 its own image b is image 0 or image 1
    (equally likely) and the other is drawn from row b of `weights`; otherwise both images are
    drawn from `weights` (without replacement) and the label is 'neither'.

    `weights` [B, B]: non-negative, zero on the diagonal. Returns (index of image 0 [B],
    index of image 1 [B], label [B] in {0: image 0, 1: image 1, 2: neither}).
    """
    batch = weights.shape[0]
    own = torch.arange(batch, device=weights.device)
    drawn = torch.multinomial(weights, 2, generator=generator)
    u = torch.rand(batch, 2, generator=generator, device=weights.device) if generator is not None else \
        torch.rand(batch, 2, device=weights.device)
    match = u[:, 0] > 1 / 3
    first = u[:, 1] > 0.5
    labels = torch.where(match, torch.where(first, 0, 1), 2)
    image0 = torch.where(match & first, own, drawn[:, 0])
    image1 = torch.where(match & ~first, own, torch.where(match, drawn[:, 0], drawn[:, 1]))
    return image0, image1, labels


class TextAssignment(nn.Module):
    """NLVR2's text-assignment pretraining model (ALBEF model_pretrain_nlvr; no momentum copies).

    `vision_proj` only picks the hard images (no gradient); `text_proj` and `temp` are kept for
    the checkpoint layout and never used, as in the original.
    """

    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 256, temp: float = 0.07):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        share_cross_attention(text_encoder.bert)
        width = text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(visual_encoder.embed_dim, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.temp = nn.Parameter(torch.tensor(temp))
        self.ta_head = nn.Linear(width, len(TA_LABELS))

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """TA loss of a batch of image-caption pairs (batch size >= 3) plus the accuracy."""
        if images.shape[0] < 3:
            raise ValueError(f"text assignment needs at least 3 images per batch, got {images.shape[0]}")
        image_embeds = self.visual_encoder(images)
        with torch.no_grad():
            # detached: a view taken under no_grad of a tensor that requires grad has no grad_fn,
            # which module hooks (torch's MemTracker, used by `albef plan`) cannot handle
            feat = F.normalize(self.vision_proj(image_embeds[:, 0].detach()), dim=-1)
            weights = (feat @ feat.t() / TA_TEMP).float().softmax(dim=1).fill_diagonal_(0)
            image0, image1, labels = assign_images(weights, generator)
        hidden = self.text_encoder.bert(
            input_ids, attention_mask, [image_embeds[image0], image_embeds[image1]], mode="multimodal"
        )
        logits = self.ta_head(hidden[:, 0])
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "loss_ta": loss.detach(), "acc": acc, "logits": logits.detach(), "labels": labels}


# ----------------------------------------------------------------------------- initialisation rules


def num_layers(state: dict[str, Tensor]) -> int:
    """Number of `text_encoder.bert.encoder.layer.N` layers in a state dict (ours naming)."""
    found = [int(m.group(2)) for k in state if k.startswith("text_encoder.bert.") and (m := _LAYER_KEY.match(k))]
    return max(found) + 1 if found else 0


def double_fusion_layers(state: dict[str, Tensor], fusion_layer: int) -> dict[str, Tensor]:
    """ALBEF Pretrain_nlvr.py's rule: text layer n < F keeps its index; fusion layer n >= F is
    copied to BOTH layers 2(n-F)+F and 2(n-F)+F+1 (the same tensor), for the student and the
    momentum text encoder alike. Every other key is unchanged."""
    out = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None or int(match.group(2)) < fusion_layer:
            out[key] = value
            continue
        prefix, n, rest = match.group(1), int(match.group(2)), match.group(3)
        for layer in (2 * (n - fusion_layer) + fusion_layer, 2 * (n - fusion_layer) + fusion_layer + 1):
            out[f"{prefix}{layer}{rest}"] = value
    return out


def doubling_note(fusion_layer: int, source_layers: int) -> str:
    """The load-report line naming where `double_fusion_layers` put every fusion layer."""
    pairs = ", ".join(f"{n}->{2 * (n - fusion_layer) + fusion_layer},{2 * (n - fusion_layer) + fusion_layer + 1}"
                      for n in range(fusion_layer, source_layers))
    return (f"fusion layers doubled (ALBEF Pretrain_nlvr.py): text_encoder.bert.encoder.layer.N.* -> layers "
            f"{pairs}; layers 0-{fusion_layer - 1} as they are")


MOMENTUM_NOTE = ("momentum encoders start from the loaded student: visual_encoder_m.* <- visual_encoder.*, "
                 "text_encoder_m.* <- text_encoder.*, cls_head_m.* <- cls_head.*")
MOMENTUM_SOURCES = ("visual_encoder.", "text_encoder.", "cls_head.")


def with_momentum_copies(state: dict[str, Tensor], replace: bool = True) -> dict[str, Tensor]:
    """Add `<module>_m.*` = `<module>.*` for the ViT, text encoder and class head of the state
    (the momentum model starts as the loaded student). With `replace`, momentum keys already in
    the state are dropped first (they belong to another model, e.g. the pretraining one)."""
    out = {k: v for k, v in state.items() if not (replace and k.startswith(tuple(p[:-1] + "_m." for p in MOMENTUM_SOURCES)))}
    for key, value in state.items():
        for prefix in MOMENTUM_SOURCES:
            if key.startswith(prefix):
                out[prefix[:-1] + "_m." + key[len(prefix):]] = value
    return out


def two_image_layout(state: dict[str, Tensor], fusion_layer: int, model_layers: int, source: str,
                     model_name: str) -> tuple[dict[str, Tensor], list[str]]:
    """A state dict with one fusion stack (pretraining: `double_fusion_layers`, and the report
    note saying so) or already two (TA / NLVR2: as it is), for a two-image model of
    `model_layers` BERT layers; CheckpointError naming `source` for any other depth."""
    found, single = num_layers(state), fusion_layer + (model_layers - fusion_layer) // 2
    if found == single:
        return double_fusion_layers(state, fusion_layer), [doubling_note(fusion_layer, single)]
    if found != model_layers:
        raise CheckpointError(
            f"{source}: its text encoder has {found} layers; {model_name} needs {single} (a pretraining checkpoint) "
            f"or {model_layers} (a TA / NLVR2 checkpoint) with model.text.fusion_layer={fusion_layer}")
    return state, []


# ----------------------------------------------------------------------------- weight adapters

# Keys of a pretraining (or retrieval) checkpoint that a classifier does not use.
PRETRAIN_ONLY = (
    "text_encoder.cls", "text_encoder_m.cls", "vision_proj", "vision_proj_m", "text_proj", "text_proj_m",
    "itm_head", "temp", "image_queue", "text_queue", "idx_queue", "queue_ptr",
)
MOMENTUM = ("visual_encoder_m", "text_encoder_m", "cls_head_m")  # a classifier's momentum copies
TA_ONLY = ("ta_head",)  # TA-only keys (ALBEF NLVR.py leaves them unexpected)
# Everything of a pretraining checkpoint TA does not use (ALBEF: unexpected keys).
TA_UNUSED = tuple(k for k in PRETRAIN_ONLY if k not in ("vision_proj", "text_proj", "temp")) + (
    "visual_encoder_m", "text_encoder_m", "cls_head", "cls_head_m")


class ClassifierAdapter(WeightAdapter):
    """ALBEF VE.py / NLVR.py: a pretraining / retrieval (NLVR2: also TA) checkpoint gives the
    ViT and the text encoder, momentum copies included; `cls_head(_m)` start fresh (and equal).
    A checkpoint of the task loads as it is. Without distillation the file's momentum copies
    are unused; with it, a file without them gives them the student's weights.

    Two images (NLVR2): one fusion stack is doubled (`two_image_layout`), and the momentum
    encoders are then copies of the mapped student (`with_momentum_copies`)."""

    def adapt(self, model: Classifier, state: dict[str, Tensor], source: str
              ) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
        notes: list[str] = []
        if model.num_images == 2:
            config = model.text_encoder.config
            state, notes = two_image_layout(state, config.fusion_layer, config.num_hidden_layers, source, "NLVR2")
            if model.distill and (notes or not any(k.startswith("text_encoder_m.") for k in state)):
                state = with_momentum_copies(state)
                notes.append(MOMENTUM_NOTE)
        elif model.distill and not any(k.startswith("visual_encoder_m.") for k in state):
            state = with_momentum_copies(state, replace=False)
        unused = list(self.unused) + ([] if model.distill else list(MOMENTUM))
        return state, unused, list(self.new), notes


class TextAssignmentAdapter(WeightAdapter):
    """ALBEF Pretrain_nlvr.py: a pretraining checkpoint with its fusion layers doubled
    (`two_image_layout`), or a TA checkpoint as it is; `ta_head` starts fresh."""

    def adapt(self, model: TextAssignment, state: dict[str, Tensor], source: str
              ) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
        config = model.text_encoder.config
        state, notes = two_image_layout(state, config.fusion_layer, config.num_hidden_layers, source,
                                        "text assignment")
        return state, list(self.unused), list(self.new), notes


VE_ADAPTER = ClassifierAdapter("ve", unused=PRETRAIN_ONLY, new=("cls_head", "cls_head_m"))
NLVR_ADAPTER = ClassifierAdapter("nlvr", unused=PRETRAIN_ONLY + TA_ONLY, new=("cls_head", "cls_head_m"))
TA_ADAPTER = TextAssignmentAdapter("nlvr-pretrain", unused=TA_UNUSED, new=("ta_head",))
