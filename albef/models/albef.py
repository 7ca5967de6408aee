"""ALBEF pretraining model: image-text contrastive (ITC), matching (ITM) and masked LM (MLM)
losses with momentum distillation and feature queues (Li et al. 2021, "Align before Fuse").

The forward changes no state besides the RNG: the engine calls `momentum_update()` and
`enqueue(*out["queue_update"])` once per optimizer step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef import dist
from albef.losses import ITC_KINDS, itc_loss, itc_stats, itc_targets, itm_loss, mlm_loss
from albef.models.bert import TextEncoder
from albef.models.momentum import enqueue_, momentum_update

LOSS_TERMS = ("itc", "itm", "mlm")
ITM_NEGATIVES = ("local", "global")


@dataclass(frozen=True)
class TokenIds:
    """Special token ids of the tokenizer (MLM never masks pad/cls/sep)."""

    pad: int
    cls: int
    sep: int
    mask: int


@dataclass
class Candidates:
    """Momentum features of the batch the local samples are scored against (local or all ranks).

    Local row i is candidate column `offset + i`; `ids` is None when samples carry no image id.
    """

    image_feat_m: Tensor
    text_feat_m: Tensor
    ids: Tensor | None
    offset: int

    def positives(self, ids: Tensor | None, batch_size: int) -> Tensor:
        """Boolean [B, C]: same image id, or the sample itself when there are no ids."""
        if ids is not None:
            return ids[:, None] == self.ids[None, :]
        cols = torch.arange(self.image_feat_m.shape[0], device=self.image_feat_m.device)
        rows = torch.arange(batch_size, device=cols.device)
        return cols[None, :] == rows[:, None] + self.offset


def _project(proj: nn.Module, embeds: Tensor) -> Tensor:
    """L2-normalised projection of the CLS token: the ITC feature."""
    return F.normalize(proj(embeds[:, 0]), dim=-1)


def mask_tokens(
    input_ids: Tensor, probability: float, token_ids: TokenIds, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """BERT masking: select tokens with `probability` (never pad/cls/sep); of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 elsewhere)."""
    special = torch.tensor([token_ids.pad, token_ids.cls, token_ids.sep], device=input_ids.device)
    selected = (torch.rand(input_ids.shape, device=input_ids.device) < probability) & ~torch.isin(input_ids, special)
    labels = input_ids.masked_fill(~selected, -100)
    choice = torch.rand(input_ids.shape, device=input_ids.device)
    random_tokens = torch.randint_like(input_ids, vocab_size)
    masked = torch.where(selected & (choice < 0.8), token_ids.mask, input_ids)
    masked = torch.where(selected & (choice >= 0.9), random_tokens, masked)
    return masked, labels


def sample_negatives(sim: Tensor, exclude: Tensor) -> tuple[Tensor, Tensor]:
    """One hard negative column per row, drawn from softmax(sim) over the non-excluded columns.

    Returns (indices [B], valid [B]); rows without any candidate draw an arbitrary index and are
    marked invalid, to be left out of the loss.
    """
    weights = sim.float().masked_fill(exclude, float("-inf")).softmax(dim=1)
    valid = ~exclude.all(dim=1)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1).squeeze(1), valid


class ALBEF(nn.Module):
    def __init__(
        self,
        visual_encoder: nn.Module,
        text_encoder: TextEncoder,
        token_ids: TokenIds,
        embed_dim: int = 256,
        temp: float = 0.07,
        momentum: float = 0.995,
        queue_size: int = 65536,
        mlm_probability: float = 0.15,
        loss_weights: dict[str, float] | None = None,
        itc_kind: str = "ce",
        itc_gather_batch: bool = False,
        itm_negatives: str = "local",
    ):
        super().__init__()
        self.loss_weights = dict(loss_weights or dict.fromkeys(LOSS_TERMS, 1.0))
        if set(self.loss_weights) != set(LOSS_TERMS) or not any(self.loss_weights.values()):
            raise ValueError(f"loss.weights needs keys {LOSS_TERMS}, at least one non-zero; got {self.loss_weights}")
        if itc_kind not in ITC_KINDS:
            raise ValueError(f"loss.itc must be one of {ITC_KINDS}, got {itc_kind!r}")
        if itm_negatives not in ITM_NEGATIVES:
            raise ValueError(f"loss.itm_negatives must be one of {ITM_NEGATIVES}, got {itm_negatives!r}")
        self.token_ids = token_ids
        self.momentum = momentum
        self.mlm_probability = mlm_probability
        self.itc_kind = itc_kind
        self.itc_gather_batch = itc_gather_batch
        self.itm_negatives = itm_negatives

        vision_width = visual_encoder.embed_dim
        text_width = text_encoder.config.hidden_size
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(temp))

        self.visual_encoder_m = self._momentum_copy(self.visual_encoder)
        self.vision_proj_m = self._momentum_copy(self.vision_proj)
        self.text_encoder_m = self._momentum_copy(self.text_encoder)
        self.text_proj_m = self._momentum_copy(self.text_proj)

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _momentum_copy(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).requires_grad_(False)

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    # ----------------------------------------------------------------------------- encoders

    def image_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Image token embeddings [B, N, W] and the normalised ITC feature [B, D]."""
        embeds = self.visual_encoder(images)
        return embeds, _project(self.vision_proj, embeds)

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text-mode token states [B, L, W] and the normalised ITC feature [B, D]."""
        embeds = self.text_encoder.bert(input_ids, attention_mask, mode="text")
        return embeds, _project(self.text_proj, embeds)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_tokens(images)[1]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_tokens(input_ids, attention_mask)[1]

    def itm_logits(self, image_embeds: Tensor, text_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Match / no-match logits [B, 2] of the fusion encoder's CLS state."""
        fused = self.text_encoder.bert(
            attention_mask=attention_mask, image_embeds=image_embeds, mode="fusion", text_embeds=text_embeds
        )
        return self.itm_head(fused[:, 0])

    def itm_score(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Probability [B] that each image matches its caption."""
        image_embeds = self.visual_encoder(images)
        text_embeds = self.text_encoder.bert(input_ids, attention_mask, mode="text")
        return self.itm_logits(image_embeds, text_embeds, attention_mask).softmax(dim=-1)[:, 1]

    # ----------------------------------------------------------------------------- forward

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float, ids: Tensor | None = None
    ) -> dict[str, Tensor | tuple[Tensor, Tensor, Tensor]]:
        """Weighted loss of the enabled terms plus detached ITC stats and `queue_update`.

        `ids` [B] are image ids: captions with the same id are positives (in batch and queue);
        without ids only the paired sample is positive, as in ALBEF pretraining.
        """
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            image_embeds_m = self.visual_encoder_m(images)
        image_embeds = self.visual_encoder(images)
        weights = self.loss_weights
        out = {}
        if weights["itc"] or weights["itm"]:
            out.update(self._align_and_match(image_embeds, image_embeds_m, input_ids, attention_mask, alpha, ids))
        if weights["mlm"]:
            out["loss_mlm"] = self._mlm(input_ids, attention_mask, image_embeds, image_embeds_m, alpha)
        out["loss"] = sum(weights[k] * out[f"loss_{k}"] for k in LOSS_TERMS if weights[k])
        return out

    def _align_and_match(
        self,
        image_embeds: Tensor,
        image_embeds_m: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        alpha: float,
        ids: Tensor | None,
    ) -> dict:
        """ITC and/or ITM, which share the unimodal features and the momentum batch features."""
        text_embeds, text_feat = self.text_tokens(input_ids, attention_mask)
        image_feat = _project(self.vision_proj, image_embeds)
        with torch.no_grad():
            image_feat_m = _project(self.vision_proj_m, image_embeds_m)
            text_feat_m = _project(self.text_proj_m, self.text_encoder_m.bert(input_ids, attention_mask, mode="text"))
        local = Candidates(image_feat_m, text_feat_m, ids, offset=0)
        needs_world = self.itc_gather_batch or self.itm_negatives == "global"
        world = _world_candidates(local) if needs_world else local

        queue_ids = ids if ids is not None else torch.full_like(input_ids[:, 0], -1)
        out = {"queue_update": (image_feat_m, text_feat_m, queue_ids.detach())}
        if self.loss_weights["itc"]:
            cand = world if self.itc_gather_batch else local
            out.update(self._itc(image_feat, text_feat, image_feat_m, text_feat_m, cand, ids, alpha))
        if self.loss_weights["itm"]:
            cand = world if self.itm_negatives == "global" else local
            out["loss_itm"] = self._itm(image_embeds, image_feat, text_embeds, text_feat, attention_mask, cand, ids)
        return out

    def _itc(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        image_feat_m: Tensor,
        text_feat_m: Tensor,
        cand: Candidates,
        ids: Tensor | None,
        alpha: float,
    ) -> dict[str, Tensor]:
        """Contrast with the candidate batch plus the queue; targets mix momentum sims and positives."""
        image_bank = torch.cat([cand.image_feat_m.t(), self.image_queue], dim=1)
        text_bank = torch.cat([cand.text_feat_m.t(), self.text_queue], dim=1)
        with torch.no_grad():
            pos = torch.cat([cand.positives(ids, len(image_feat)), self._queue_positives(ids, len(image_feat))], dim=1)
            targets_i2t = itc_targets(image_feat_m @ text_bank / self.temp, pos, alpha)
            targets_t2i = itc_targets(text_feat_m @ image_bank / self.temp, pos, alpha)
        sim_i2t = image_feat @ text_bank / self.temp
        sim_t2i = text_feat @ image_bank / self.temp
        loss = (itc_loss(sim_i2t, targets_i2t, self.itc_kind) + itc_loss(sim_t2i, targets_t2i, self.itc_kind)) / 2
        return {"loss_itc": loss, **itc_stats(sim_i2t, sim_t2i, targets_i2t, targets_t2i)}

    def _queue_positives(self, ids: Tensor | None, batch_size: int) -> Tensor:
        """Boolean [B, Q]: queue entries with the same image id (none without ids)."""
        if ids is None:
            return self.idx_queue.new_zeros(batch_size, self.idx_queue.shape[1], dtype=torch.bool)
        return ids[:, None] == self.idx_queue

    def _itm(
        self,
        image_embeds: Tensor,
        image_feat: Tensor,
        text_embeds: Tensor,
        text_feat: Tensor,
        attention_mask: Tensor,
        cand: Candidates,
        ids: Tensor | None,
    ) -> Tensor:
        """Matching loss on the positive pairs and one hard negative per image and per text,
        sampled by contrastive similarity among the candidates (never a positive or same id)."""
        batch_size = len(image_embeds)
        image_pool, text_pool, mask_pool = image_embeds, text_embeds, attention_mask
        if self.itm_negatives == "global":
            text_embeds, attention_mask = _pad_to_world_length(text_embeds, attention_mask)
            image_pool = dist.all_gather_with_grad(image_embeds)
            text_pool = dist.all_gather_with_grad(text_embeds)
            mask_pool = dist.all_gather_concat(attention_mask)
        with torch.no_grad():
            exclude = cand.positives(ids, batch_size)
            neg_images, valid_images = sample_negatives(text_feat @ cand.image_feat_m.t() / self.temp, exclude)
            neg_texts, valid_texts = sample_negatives(image_feat @ cand.text_feat_m.t() / self.temp, exclude)
        logits = self.itm_logits(
            torch.cat([image_embeds, image_pool[neg_images], image_embeds]),
            torch.cat([text_embeds, text_embeds, text_pool[neg_texts]]),
            torch.cat([attention_mask, attention_mask, mask_pool[neg_texts]]),
        )
        labels = torch.cat([torch.ones_like(neg_images), torch.zeros_like(neg_images), torch.zeros_like(neg_texts)])
        sample_weight = torch.cat([torch.ones_like(valid_images), valid_images, valid_texts])
        return itm_loss(logits, labels, sample_weight)

    def _mlm(
        self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor, image_embeds_m: Tensor, alpha: float
    ) -> Tensor:
        """Masked LM conditioned on the image, distilled from the momentum model's predictions."""
        vocab_size = self.text_encoder.config.vocab_size
        masked_ids, labels = mask_tokens(input_ids, self.mlm_probability, self.token_ids, vocab_size)
        positions = labels != -100
        logits = self.text_encoder.mlm_logits(self.text_encoder(masked_ids, attention_mask, image_embeds), positions)
        with torch.no_grad():
            hidden_m = self.text_encoder_m(masked_ids, attention_mask, image_embeds_m)
            soft_targets = self.text_encoder_m.mlm_logits(hidden_m, positions).float().softmax(dim=-1)
        return mlm_loss(logits, labels[positions], soft_targets, alpha)

    # ----------------------------------------------------------------------------- state updates

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA of the online parameters into the momentum copies (one fused call)."""
        online, momentum = [], []
        for model, model_m in self._momentum_pairs():
            online.extend(model.parameters())
            momentum.extend(model_m.parameters())
        momentum_update(online, momentum, self.momentum)

    @torch.no_grad()
    def enqueue(self, image_feat_m: Tensor, text_feat_m: Tensor, ids: Tensor) -> None:
        """Push every rank's momentum features (in rank order) into the queues."""
        feats, counts = dist.gather_rows(torch.cat([image_feat_m, text_feat_m], dim=1))
        image_feat_m, text_feat_m = feats.split(image_feat_m.shape[1], dim=1)
        ids = dist.gather_rows(ids, counts)[0]
        enqueue_(
            [self.image_queue, self.text_queue, self.idx_queue],
            self.queue_ptr,
            [image_feat_m.t(), text_feat_m.t(), ids[None, :]],
        )


def _world_candidates(local: Candidates) -> Candidates:
    """The momentum features of all ranks; this rank's rows start after those of lower ranks."""
    image_feat_m, counts = dist.gather_rows(local.image_feat_m)
    return Candidates(
        image_feat_m,
        dist.gather_rows(local.text_feat_m, counts)[0],
        None if local.ids is None else dist.gather_rows(local.ids, counts)[0],
        offset=sum(counts[: dist.get_rank()]),
    )


def _pad_to_world_length(text_embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-pad text states and mask to the longest text length of all ranks (for gathering)."""
    pad = dist.max_across_ranks(text_embeds.shape[1], text_embeds.device) - text_embeds.shape[1]
    return F.pad(text_embeds, (0, 0, 0, pad)), F.pad(attention_mask, (0, pad))
