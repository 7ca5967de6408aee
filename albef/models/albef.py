"""ALBEF pretraining model: image-text contrastive (ITC), matching (ITM) and masked LM (MLM)
losses with momentum distillation and feature queues (Li et al. 2021, "Align before Fuse").

The forward changes no state besides the RNG: the engine calls `momentum_update()` before each
optimizer step's first forward (ALBEF's timing) and the task `enqueue(*out["queue_update"])`
after the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef import dist
from albef.losses import ITC_KINDS, itc_loss, itc_stats, itc_targets, itm_loss, mlm_loss
from albef.masking import TokenIds, mask_tokens, special_tokens
from albef.models.bert import TextEncoder
from albef.models.ops import TiedGradient
from albef.models.momentum import MomentumModel, enqueue_, momentum_copy
from albef.weights import WeightAdapter

LOSS_TERMS = ("itc", "itm", "mlm")
ITM_NEGATIVES = ("local", "global")


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
    """L2-normalised projection of the CLS token: the ITC feature (fp32)."""
    return F.normalize(proj(embeds[:, 0]).float(), dim=-1)


def similarity(features: Tensor, bank: Tensor, temp: Tensor) -> Tensor:
    """`features @ bank / temp` in fp32 with autocast off (ITC logits, targets, ITM sampling)."""
    with torch.autocast(features.device.type, enabled=False):
        return features.float() @ bank.float() / temp.float()


def sample_negatives(sim: Tensor, exclude: Tensor) -> tuple[Tensor, Tensor]:
    """One hard negative column per row, drawn from softmax(sim) over the non-excluded columns.

    Returns (indices [B], valid [B]); rows without any candidate, or with non-finite
    similarities (a NaN/Inf feature), draw an arbitrary index and are marked invalid, to be left
    out of the loss (a non-finite feature also makes the loss non-finite: the step is skipped).
    """
    weights = sim.float().masked_fill(exclude, float("-inf")).softmax(dim=1)
    valid = ~exclude.all(dim=1) & torch.isfinite(weights).all(dim=1)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1).squeeze(1), valid


@dataclass
class FusionBatch:
    """The text rows of a step's single fusion pass, added in groups (ITM, then MLM).

    Each group: text states [G, L, H], mask [G, L], `kv_index` [G] (which image each row reads:
    index into the local images followed by `extra_images`; None = row i reads image i) and the
    (batch, position) rows its head reads.
    """

    groups: list[tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, Tensor]]] = field(default_factory=list)
    extra_images: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, states: Tensor, mask: Tensor, kv_index: Tensor | None, rows: tuple[Tensor, Tensor]) -> None:
        self.groups.append((states, mask, kv_index, rows))

    def concat(self, num_images: int) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor], list[int]]:
        """All groups as one batch (right-padded to the longest text): states, mask, kv_index,
        head rows (batch, position) and the number of head rows per group."""
        length = max(states.shape[1] for states, *_ in self.groups)
        states, masks, kv_index, batch, position, sizes, offset = [], [], [], [], [], [], 0
        for group_states, mask, index, (rows_batch, rows_position) in self.groups:
            pad = length - group_states.shape[1]
            states.append(F.pad(group_states, (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad)))
            count = len(group_states)
            kv_index.append(torch.arange(count, device=mask.device) if index is None else index)
            batch.append(rows_batch + offset)
            position.append(rows_position)
            sizes.append(len(rows_batch))
            offset += count
        return torch.cat(states), torch.cat(masks), torch.cat(kv_index), (torch.cat(batch), torch.cat(position)), sizes


class ALBEF(MomentumModel):
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
        mlm_mask_sep: bool = True,
        cache_image_kv: bool = True,
        prune_last_layer: bool = True,
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
        self.mlm_mask_sep = mlm_mask_sep
        # Exact shortcuts of the fusion pass (see bert.py); off = the plain computation, for tests.
        self.cache_image_kv = cache_image_kv
        self.prune_last_layer = prune_last_layer
        self.register_buffer("never_masked", special_tokens(token_ids, mlm_mask_sep), persistent=False)

        vision_width = visual_encoder.embed_dim
        text_width = text_encoder.config.hidden_size
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(temp))

        self.visual_encoder_m = momentum_copy(self.visual_encoder)
        self.vision_proj_m = momentum_copy(self.vision_proj)
        self.text_encoder_m = momentum_copy(self.text_encoder)
        self.text_proj_m = momentum_copy(self.text_proj)

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

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
        batch = torch.arange(len(text_embeds), device=text_embeds.device)
        cls = self.text_encoder.bert(
            attention_mask=attention_mask, image_embeds=image_embeds, mode="fusion", text_embeds=text_embeds,
            output_rows=(batch, torch.zeros_like(batch)),
        )
        return self.itm_head(cls)

    def itm_score(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Probability [B] that each image matches its caption."""
        image_embeds = self.visual_encoder(images)
        text_embeds = self.text_encoder.bert(input_ids, attention_mask, mode="text")
        return self.itm_logits(image_embeds, text_embeds, attention_mask).softmax(dim=-1)[:, 1]

    # ----------------------------------------------------------------------------- forward

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float, ids: Tensor | None = None,
        mlm_masks: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor | tuple[Tensor, Tensor, Tensor]]:
        """Weighted loss of the enabled terms plus detached ITC stats and `queue_update`.

        `ids` [B] are image ids: captions with the same id are positives (in batch and queue);
        without ids only the paired sample is positive, as in ALBEF pretraining.

        `mlm_masks`: the captions already masked (`albef.data.masking.MLMMasking`, the training
        collate: ``mlm_input_ids``, ``mlm_labels``, ``mlm_batch``, ``mlm_position``); without it the
        forward masks them itself, at the cost of one host sync (the number of masked tokens).

        One pass per encoder: the text layers run once over the captions and their masked copies,
        the fusion layers once over the 3B ITM rows and the B MLM rows, with the cross-attention
        keys/values of the B images computed once per layer (`cache_image_kv`) and the last layer
        computing only the rows the heads read (`prune_last_layer`).
        """
        weights = self.loss_weights
        contrast, mlm = bool(weights["itc"] or weights["itm"]), bool(weights["mlm"])
        batch_size = len(input_ids)
        if mlm and mlm_masks is not None:  # masked in the collate: no host sync
            masked_ids, labels = mlm_masks["mlm_input_ids"], mlm_masks["mlm_labels"]
            mlm_batch, mlm_position = mlm_masks["mlm_batch"], mlm_masks["mlm_position"]
        elif mlm:  # first in the forward: the host sync (masked positions) waits for no queued work
            masked_ids, labels = mask_tokens(
                input_ids, self.mlm_probability, self.token_ids, self.text_encoder.config.vocab_size,
                mask_sep=self.mlm_mask_sep, special=self.never_masked)
            mlm_batch, mlm_position = (labels != -100).nonzero(as_tuple=True)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            image_embeds_m = self.visual_encoder_m(images)
        image_embeds = self.visual_encoder(images)

        # Text layers, online and momentum: captions (ITC/ITM) and masked captions (MLM) together.
        text_ids = torch.cat(([input_ids] if contrast else []) + ([masked_ids] if mlm else []))
        text_mask = attention_mask.repeat(int(contrast) + int(mlm), 1)
        # one gradient tensor for the word embeddings and the tied MLM decoder (ops.TiedGradient)
        tied = TiedGradient() if mlm and self.text_encoder.tied_mlm_decoder else None
        text_states = self.text_encoder.bert(text_ids, text_mask, mode="text", tied_grad=tied)
        with torch.no_grad():
            text_states_m = self.text_encoder_m.bert(text_ids, text_mask, mode="text")

        out, fusion = {}, FusionBatch()
        if contrast:
            out.update(self._align_and_match(
                image_embeds, image_embeds_m, text_states[:batch_size], text_states_m[:batch_size],
                attention_mask, alpha, ids, fusion))
        if mlm:
            mlm_rows = (mlm_batch, mlm_position)
            fusion.add(text_states[-batch_size:], attention_mask, None, mlm_rows)
        if len(fusion):
            fused = self._fuse(fusion, image_embeds)
            if weights["itm"]:
                out["loss_itm"] = itm_loss(self.itm_head(fused[0]), *out.pop("itm_targets"))
            if mlm:
                logits = self.text_encoder.cls.predictions(fused[-1], tied)
                with torch.no_grad():
                    hidden_m = self._fuse_momentum(text_states_m[-batch_size:], attention_mask, image_embeds_m,
                                                   mlm_rows)
                    soft_targets = self.text_encoder_m.cls.predictions(hidden_m).float().softmax(dim=-1)
                out["loss_mlm"] = mlm_loss(logits, labels[mlm_rows], soft_targets, alpha)
        out["loss"] = sum(weights[k] * out[f"loss_{k}"] for k in LOSS_TERMS if weights[k])
        return out

    def _fuse(self, fusion: FusionBatch, image_embeds: Tensor) -> list[Tensor]:
        """One fusion pass over every group of rows; returns each group's head rows [R_g, H]."""
        states, mask, kv_index, rows, sizes = fusion.concat(image_embeds.shape[0])
        kv_images = torch.cat([image_embeds, *fusion.extra_images]) if fusion.extra_images else image_embeds
        bert = self.text_encoder.bert
        kwargs = dict(output_rows=rows if self.prune_last_layer else None)
        if self.cache_image_kv:  # keys/values once per image and fusion layer
            kwargs.update(image_embeds=kv_images, kv_index=kv_index)
        else:
            kwargs.update(image_embeds=kv_images[kv_index])
        hidden = bert(attention_mask=mask, mode="fusion", text_embeds=states, **kwargs)
        if not self.prune_last_layer:
            hidden = hidden[rows]
        return list(hidden.split(sizes))

    @torch.no_grad()
    def _fuse_momentum(
        self, states: Tensor, attention_mask: Tensor, image_embeds: Tensor, rows: tuple[Tensor, Tensor]
    ) -> Tensor:
        bert = self.text_encoder_m.bert
        if not self.prune_last_layer:
            return bert(attention_mask=attention_mask, image_embeds=image_embeds, mode="fusion",
                        text_embeds=states)[rows]
        return bert(attention_mask=attention_mask, image_embeds=image_embeds, mode="fusion", text_embeds=states,
                    output_rows=rows)

    def _align_and_match(
        self,
        image_embeds: Tensor,
        image_embeds_m: Tensor,
        text_embeds: Tensor,
        text_embeds_m: Tensor,
        attention_mask: Tensor,
        alpha: float,
        ids: Tensor | None,
        fusion: FusionBatch,
    ) -> dict:
        """ITC and/or ITM, which share the unimodal features and the momentum batch features.
        ITM adds its 3B rows to `fusion` and returns its (labels, sample weights) as `itm_targets`."""
        text_feat = _project(self.text_proj, text_embeds)
        image_feat = _project(self.vision_proj, image_embeds)
        with torch.no_grad():
            image_feat_m = _project(self.vision_proj_m, image_embeds_m)
            text_feat_m = _project(self.text_proj_m, text_embeds_m)
        local = Candidates(image_feat_m, text_feat_m, ids, offset=0)
        needs_world = self.itc_gather_batch or self.itm_negatives == "global"
        world = _world_candidates(local) if needs_world else local

        queue_ids = ids if ids is not None else torch.full_like(attention_mask[:, 0], -1)
        out = {"queue_update": (image_feat_m, text_feat_m, queue_ids.detach())}
        if self.loss_weights["itc"]:
            cand = world if self.itc_gather_batch else local
            out.update(self._itc(image_feat, text_feat, image_feat_m, text_feat_m, cand, ids, alpha))
        if self.loss_weights["itm"]:
            cand = world if self.itm_negatives == "global" else local
            out["itm_targets"] = self._itm(image_embeds, image_feat, text_embeds, text_feat, attention_mask, cand,
                                           ids, fusion)
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
        """Contrast with the candidate batch plus the queue; targets mix momentum sims and positives.
        Similarities are fp32 (autocast off): bf16 logits at temp 0.07 are visibly off."""
        image_bank = torch.cat([cand.image_feat_m.t(), self.image_queue], dim=1)
        text_bank = torch.cat([cand.text_feat_m.t(), self.text_queue], dim=1)
        with torch.no_grad():
            pos = torch.cat([cand.positives(ids, len(image_feat)), self._queue_positives(ids, len(image_feat))], dim=1)
            targets_i2t = itc_targets(similarity(image_feat_m, text_bank, self.temp), pos, alpha)
            targets_t2i = itc_targets(similarity(text_feat_m, image_bank, self.temp), pos, alpha)
        sim_i2t = similarity(image_feat, text_bank, self.temp)
        sim_t2i = similarity(text_feat, image_bank, self.temp)
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
        fusion: FusionBatch,
    ) -> tuple[Tensor, Tensor]:
        """Matching rows: the positive pairs and one hard negative per image and per text, sampled
        by contrastive similarity among the candidates (never a positive or same id). Adds the
        3B [CLS] rows to `fusion`; returns (labels, sample weights) for `itm_loss`."""
        batch_size = len(image_embeds)
        local = torch.arange(batch_size, device=image_embeds.device)
        text_pool, mask_pool = text_embeds, attention_mask
        if self.itm_negatives == "global":
            text_embeds, attention_mask = _pad_to_world_length(text_embeds, attention_mask)
            image_pool = dist.all_gather_with_grad(image_embeds)
            text_pool = dist.all_gather_with_grad(text_embeds)
            mask_pool = dist.all_gather_concat(attention_mask)
        with torch.no_grad():
            exclude = cand.positives(ids, batch_size)
            neg_images, valid_images = sample_negatives(similarity(text_feat, cand.image_feat_m.t(), self.temp), exclude)
            neg_texts, valid_texts = sample_negatives(similarity(image_feat, cand.text_feat_m.t(), self.temp), exclude)
        if self.itm_negatives == "global":  # the negative images join the local ones as extra K/V images
            neg_image_index = local + batch_size
            fusion.extra_images.append(image_pool.index_select(0, neg_images))
        else:
            neg_image_index = neg_images
        cls = torch.zeros(3 * batch_size, dtype=torch.long, device=local.device)
        fusion.add(
            torch.cat([text_embeds, text_embeds, text_pool.index_select(0, neg_texts)]),
            torch.cat([attention_mask, attention_mask, mask_pool[neg_texts]]),
            torch.cat([local, neg_image_index, local]),
            (torch.arange(3 * batch_size, device=local.device), cls),
        )
        labels = torch.cat([torch.ones_like(neg_images), torch.zeros_like(neg_images), torch.zeros_like(neg_texts)])
        sample_weight = torch.cat([torch.ones_like(valid_images), valid_images, valid_texts])
        return labels, sample_weight

    # ----------------------------------------------------------------------------- state updates

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


# ----------------------------------------------------------------------------- weight adapters

QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")  # training state, not weights
MLM_HEADS = ("text_encoder.cls", "text_encoder_m.cls")  # what a retrieval model has no use for


class RetrievalAdapter(WeightAdapter):
    """ALBEF's rule (Retrieval.py): every key of a pretraining or retrieval checkpoint, the
    position embeddings of both ViTs resampled, the MLM heads dropped. The feature queues are
    taken as they are; the image ids of a pretraining queue belong to another data set, so they
    are dropped and the queue's ids start unknown (never positives)."""

    def adapt(self, model: nn.Module, state: dict[str, Tensor], source: str
              ) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
        pretraining = any(k.startswith(MLM_HEADS) for k in state)
        return state, list(self.unused) + (["idx_queue"] if pretraining else []), list(self.new), []


# Pretraining (and any task on the ALBEF model without rules of its own): the keys must match
# exactly (pos_embed resampled); feature queues the file lacks are kept as initialised.
ALBEF_ADAPTER = WeightAdapter("albef", new=QUEUE_KEYS)
RETRIEVAL_ADAPTER = RetrievalAdapter("albef-retrieval", unused=MLM_HEADS, new=QUEUE_KEYS)
