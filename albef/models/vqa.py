"""ALBEF's VQA model (`model_vqa.py`): the question is fused with the image by the text
encoder, and an answer decoder generates the answer while cross-attending to the fused
question states.

* `text_encoder`: our `TextEncoder` (all layers, no MLM head), question + image.
* `text_decoder`: `AnswerDecoder`, ALBEF's `BertLMHeadModel`: a BERT with causal
  self-attention in which every layer cross-attends to the question states, and an LM head
  over all positions (tied to its word embeddings). Its depth is the number of fusion layers
  of the encoder (6 for ALBEF), so it can start as a copy of the pretrained fusion layers
  (`init_from_pretrain_state`).
* momentum copies `visual_encoder_m`, `text_encoder_m`, `text_decoder_m` when `distill`.

Training scores every (question, answer) pair of the batch with the answer's sequence
log-likelihood, weights it (`count / #answers` for VQA, 0.5 for VG) and distils from the
momentum decoder's token distributions. Inference ranks a fixed answer list
(`rank_answers`).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import Tensor, nn

from albef.losses import answer_sequence_loss
from albef.models.bert import TextEncoder, _key_mask
from albef.models.momentum import MomentumModel, momentum_copy
from albef.weights import WeightAdapter

# Keys of an ALBEF pretraining checkpoint the VQA model has no place for.
UNUSED_FROM_PRETRAIN = (
    "temp", "image_queue", "text_queue", "idx_queue", "queue_ptr",
    "vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m",
)
_FILE_LAYER_RE = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
_ENCODER_RE = re.compile(r"^text_encoder(_m)?\.(bert\.embeddings\.|bert\.encoder\.layer\.(\d+)\.|cls\.)(.*)$")


class AnswerDecoder(TextEncoder):
    """ALBEF's `BertLMHeadModel`: causal BERT, cross-attention to the question states in every
    layer, LM head on all positions. Keys `bert.embeddings.*`, `bert.encoder.layer.N.*`, `cls.*`
    as in released ALBEF VQA checkpoints; `cls.predictions.decoder` is tied to the word embeddings.

    Build it from the question encoder's BERT config with `decoder_config`.
    """

    def load_bert_state_dict(self, state_dict: dict[str, Tensor], source: str = "BERT weights") -> Any:
        """HF BERT weights for the decoder: its layers are the first ones of the file (ALBEF's
        `BertLMHeadModel.from_pretrained` with 6 layers of bert-base); deeper file layers are left out."""
        depth = self.config.num_hidden_layers
        kept = {k: v for k, v in state_dict.items()
                if (m := _FILE_LAYER_RE.search(k)) is None or int(m[1]) < depth}
        return super().load_bert_state_dict(kept, source)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None, states: Tensor, states_mask: Tensor) -> Tensor:
        """Vocabulary logits [B, L, V] of every position: token i sees tokens <= i and the states."""
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None, None] if attention_mask is None else causal[None, None] & _key_mask(attention_mask)
        hidden = self.bert.embeddings(input_ids)
        hidden, _ = self.bert.encoder(hidden, mask, slice(None), states, _key_mask(states_mask))
        return self.cls.predictions(hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, states: Tensor, states_mask: Tensor) -> Tensor:
        return self.logits(input_ids, attention_mask, states, states_mask)


def decoder_config(encoder_config: Any) -> Any:
    """The answer decoder's BERT config: the encoder's, with one cross-attending layer per fusion
    layer (ALBEF: 12 - 6 = 6), attending to question states of the encoder's width."""
    config = copy.deepcopy(encoder_config)
    config.num_hidden_layers = encoder_config.num_hidden_layers - encoder_config.fusion_layer
    config.fusion_layer = 0
    config.encoder_width = encoder_config.hidden_size
    return config


class VQAModel(MomentumModel):
    def __init__(
        self,
        visual_encoder: nn.Module,
        text_encoder: TextEncoder,
        text_decoder: AnswerDecoder,
        pad_token_id: int,
        distill: bool = True,
        momentum: float = 0.995,
    ):
        super().__init__()
        if text_decoder.config.hidden_size != text_encoder.config.hidden_size:
            raise ValueError("the answer decoder must have the text encoder's width")
        self.pad_token_id = pad_token_id
        self.distill = distill
        self.momentum = momentum
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        if distill:
            self.visual_encoder_m = momentum_copy(visual_encoder)
            self.text_encoder_m = momentum_copy(text_encoder)
            self.text_decoder_m = momentum_copy(text_decoder)

    def encode_question(self, images: Tensor, question_ids: Tensor, question_mask: Tensor, momentum: bool = False
                        ) -> Tensor:
        """Question states [B, L, W] fused with the image."""
        if momentum:
            return self.text_encoder_m(question_ids, question_mask, self.visual_encoder_m(images))
        return self.text_encoder(question_ids, question_mask, self.visual_encoder(images))

    def forward(
        self,
        images: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        answer_weights: Tensor,
        answers_per_question: Tensor,
        alpha: float = 0.0,
    ) -> dict[str, Tensor]:
        """Weighted answer loss: sum over the A answers of weight * sequence loss, divided by B.

        `answers_per_question` [B] says how many of the A answer rows belong to each question
        (in order). With `distill`, each token's target mixes the ground truth (1 - alpha) with
        the momentum decoder's distribution (alpha), as ALBEF.
        """
        states = self.encode_question(images, question_ids, question_mask)
        rows = answer_ids.shape[0]  # the output size, known without reading the counts (no host sync)
        states = states.repeat_interleave(answers_per_question, dim=0, output_size=rows)
        states_mask = question_mask.repeat_interleave(answers_per_question, dim=0, output_size=rows)
        targets = answer_ids.masked_fill(answer_ids == self.pad_token_id, -100)[:, 1:]
        soft_targets = None
        if self.distill:
            with torch.no_grad():
                states_m = self.encode_question(images, question_ids, question_mask, momentum=True)
                states_m = states_m.repeat_interleave(answers_per_question, dim=0, output_size=rows)
                logits_m = self.text_decoder_m(answer_ids, answer_mask, states_m, states_mask)[:, :-1]
                soft_targets = logits_m.float().softmax(dim=-1)
        logits = self.text_decoder(answer_ids, answer_mask, states, states_mask)[:, :-1]
        per_answer = answer_sequence_loss(logits, targets, soft_targets, alpha)
        loss = (answer_weights * per_answer).sum() / images.shape[0]
        return {"loss": loss, "loss_vqa": loss.detach()}

    # ----------------------------------------------------------------------------- inference

    @torch.no_grad()
    def rank_answers(
        self,
        states: Tensor,
        states_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        k: int,
        count_first_token_twice: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """ALBEF's `rank_answer` over a tokenized answer list ([A, L], each `[CLS] answer ... [SEP]`).

        1. The probability of each answer's first token after `[CLS]` keeps the top k answers.
        2. Those k are scored by their full-sequence log-likelihood, softmaxed over the k and
           sorted. ALBEF adds the first token's log-probability from step 1 to the sequence
           log-likelihood (which already contains it), so it counts twice; set
           `count_first_token_twice=False` for the plain sequence likelihood.

        Returns (answer indices [N, k], their probabilities [N, k]), best first.
        """
        num_questions = states.shape[0]
        k = min(k, answer_ids.shape[0])
        start = answer_ids[:1, :1].expand(num_questions, 1)
        first_logits = self.text_decoder(start, None, states, states_mask)[:, 0]
        first_probs = first_logits.float().softmax(dim=-1).index_select(1, answer_ids[:, 1])
        topk_probs, topk_ids = first_probs.topk(k, dim=1)

        ids = answer_ids[topk_ids].flatten(0, 1)
        mask = answer_mask[topk_ids].flatten(0, 1)
        targets = ids.masked_fill(ids == self.pad_token_id, -100)[:, 1:]
        logits = self.text_decoder(
            ids, mask, states.repeat_interleave(k, dim=0), states_mask.repeat_interleave(k, dim=0)
        )[:, :-1]
        log_likelihood = -answer_sequence_loss(logits, targets).view(num_questions, k)
        if count_first_token_twice:
            log_likelihood = log_likelihood + topk_probs.log()
        probs, order = log_likelihood.softmax(dim=-1).topk(k, dim=1)
        return topk_ids.gather(1, order), probs


def init_from_pretrain_state(state: dict[str, Tensor], fusion_layer: int) -> dict[str, Tensor]:
    """ALBEF's VQA initialisation from a pretraining checkpoint (VQA.py:146-184), on our keys.

    The text encoder keeps every layer. The answer decoder (and its momentum copy) is built from
    the pretrained fusion layers: decoder layer j <- encoder layer j + `fusion_layer`, decoder
    embeddings <- encoder embeddings, decoder LM head <- the pretraining MLM head (which the
    encoder loses). All other keys pass through unchanged. A pure function of the state dict.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _ENCODER_RE.match(key)
        if match is None:
            out[key] = value
            continue
        momentum, part, layer, rest = match.groups()
        decoder = f"text_decoder{momentum or ''}."
        if part.startswith("bert.encoder.layer."):
            out[key] = value
            if int(layer) >= fusion_layer:
                out[f"{decoder}bert.encoder.layer.{int(layer) - fusion_layer}.{rest}"] = value
        elif part == "bert.embeddings.":
            out[key] = value
            out[f"{decoder}{part}{rest}"] = value
        else:  # cls.: the MLM head moves to the decoder
            out[f"{decoder}{part}{rest}"] = value
    return out


def is_vqa_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict already holds an answer decoder (a VQA checkpoint, no remapping)."""
    return any(k.startswith("text_decoder.") for k in state)


class VQAAdapter(WeightAdapter):
    """ALBEF VQA.py: a VQA checkpoint loads as it is; a pretraining one through ALBEF's decoder
    rule (`init_from_pretrain_state`), its ITC/ITM parts and queues unused, and without
    distillation its momentum copies too."""

    def adapt(self, model: VQAModel, state: dict[str, Tensor], source: str
              ) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
        if is_vqa_state(state):
            return state, [], [], []
        mapped = init_from_pretrain_state(state, model.text_encoder.config.fusion_layer)
        unused = list(self.unused)
        if not model.distill:
            unused += ["visual_encoder_m", "text_encoder_m", "text_decoder_m"]
        return mapped, unused, list(self.new), []


VQA_ADAPTER = VQAAdapter("vqa", unused=UNUSED_FROM_PRETRAIN)
