"""ALBEF retrieval evaluation (ITC ranking, ITM re-ranking of the top-k, R@1/5/10), shared by
pretraining, retrieval fine-tuning and grounding; its encoders and ITM pair scoring also serve
zero-shot classification. Not a task: the task is albef/tasks/retrieval.py."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from albef.data.retrieval import RetrievalDataset
from albef.data.transforms import eval_transform
from albef.dist import get_rank
from albef.engine.evaluation import eval_files, gather_rows, inference_autocast, progress, shard, stoppable
from albef.metrics import RECALL_AT, chance_recall, retrieval_recall
from albef.models import build_tokenizer
from albef.visualize_retrieval import save_retrieval_examples

def _storage_dtype(device: torch.device, precision: str) -> torch.dtype:
    """dtype the image tokens are kept in between encoding and re-ranking: the autocast dtype on
    CUDA (the cross-attention projections cast them to it anyway, so nothing changes), else fp32."""
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int, device, bar=None):
    """Unimodal text states [T, max_tokens, H] (fp32), normalised ITC features [T, D] and
    attention masks [T, max_tokens] of `texts` (an empty list gives empty tensors)."""
    embeds, feats, masks = [], [], []
    starts = range(0, max(len(texts), 1), batch_size)
    for start in stoppable(starts, len(starts)):
        batch = list(texts[start : start + batch_size])
        tokens = tokenizer(batch or [""], padding="max_length", truncation=True, max_length=max_tokens,
                           return_tensors="pt").to(device)
        embed, feat = model.text_tokens(tokens.input_ids, tokens.attention_mask)
        embeds.append(embed.float()[: len(batch)])  # fp32 (a LayerNorm output): exactly what the model made
        feats.append(feat.float()[: len(batch)])
        masks.append(tokens.attention_mask[: len(batch)])
        if bar is not None:
            bar.update(len(batch))
    return torch.cat(embeds), torch.cat(feats), torch.cat(masks)


@torch.no_grad()
def encode_images(model, loader: DataLoader, device, dtype: torch.dtype = torch.float32, bar=None):
    """Patch tokens (in `dtype`) and normalised ITC features (fp32) of the loader's images."""
    embeds, feats = [], []
    for images in stoppable(loader, len(loader)):
        embed, feat = model.image_tokens(images.to(device, non_blocking=True))
        embeds.append(embed.to(dtype))
        feats.append(feat.float())
        if bar is not None:
            bar.update(len(images))
    if not embeds:  # an empty shard: no tokens, and features of the right width to gather
        return None, torch.zeros(0, model.vision_proj.out_features, device=device)
    return torch.cat(embeds), torch.cat(feats)


def candidate_pairs(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, text) pairs ITM must score: each image's top-k texts and each text's top-k
    images by ITC similarity (`sims` [I, T]).

    Returns (pairs, i2t_topk [I, k], t2i_topk [T, k]); `pairs` are the distinct pairs, coded
    `image * T + text`, sorted, so that those of a block of images are contiguous. A pair in both
    top-k lists is scored once: its ITM score does not depend on the direction.
    """
    num_images, num_texts = sims.shape
    i2t = sims.topk(min(k, num_texts), dim=1).indices
    t2i = sims.t().topk(min(k, num_images), dim=1).indices
    rows = torch.arange(num_images, device=sims.device)[:, None] * num_texts
    cols = torch.arange(num_texts, device=sims.device)[:, None]
    pairs = torch.cat([(rows + i2t).flatten(), (t2i * num_texts + cols).flatten()]).unique(sorted=True)
    return pairs, i2t, t2i


def topk_matrix(sims: torch.Tensor, topk: torch.Tensor, pair_codes: torch.Tensor, pair_scores: torch.Tensor,
                transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrices of one direction, -100 outside each query's top-k: the ITM score (ALBEF)
    and the ITM score plus the ITC similarity (BLIP / LAVIS).

    `sims` [I, T]; `topk` [Q, k] candidates of each query (texts of an image, or images of a text
    when `transpose`); `pair_codes` (sorted) and `pair_scores` the ITM score of every pair.
    """
    num_texts = sims.shape[1]
    queries = torch.arange(topk.shape[0], device=topk.device)[:, None].expand_as(topk)
    images, texts = (topk, queries) if transpose else (queries, topk)
    codes = images * num_texts + texts
    score = pair_scores[torch.searchsorted(pair_codes, codes)]
    similarity = (sims.t() if transpose else sims).gather(1, topk)
    itm = torch.full((topk.shape[0], sims.shape[0] if transpose else num_texts), -100.0, device=sims.device)
    itm_itc = itm.clone()
    itm.scatter_(1, topk, score)
    itm_itc.scatter_(1, topk, score + similarity)
    return itm, itm_itc


def pair_itm_logits(model, image_embeds: torch.Tensor, image_index: torch.Tensor, text_embeds: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """ITM logits [B, 2] of text rows against images: row b reads `image_embeds[image_index[b]]`.

    When the text encoder offers `cross_attention_kv` (the fusion layers' keys/values computed
    once per image), each image's keys and values are computed once and shared by its rows;
    otherwise each row gets its own copy of the image tokens (`model.itm_logits`).
    """
    bert = model.text_encoder.bert
    if getattr(bert, "cross_attention_kv", None) is not None:
        rows = torch.arange(len(text_embeds), device=text_embeds.device)
        cls = bert(attention_mask=attention_mask, mode="fusion", text_embeds=text_embeds,
                   image_kv=bert.cross_attention_kv(image_embeds), kv_index=image_index,
                   output_rows=(rows, torch.zeros_like(rows)))
        return model.itm_head(cls)
    return model.itm_logits(image_embeds[image_index], text_embeds, attention_mask)


@torch.no_grad()
def score_pairs(model, pairs: torch.Tensor, num_texts: int, image_embeds: torch.Tensor, first_image: int,
                text_embeds: torch.Tensor, text_masks: torch.Tensor, batch_size: int, bar=None) -> torch.Tensor:
    """ITM match logit of each pair (codes of `candidate_pairs`, all of images held here:
    `image_embeds[i - first_image]`), in fusion batches of at most `batch_size` pairs; a batch
    holds the pairs of one or a few images, whose tokens enter it once."""
    scores = []
    starts = range(0, len(pairs), batch_size)
    for start in stoppable(starts, len(starts)):
        codes = pairs[start : start + batch_size]
        images, texts = codes // num_texts - first_image, codes % num_texts
        distinct, image_index = images.unique(sorted=True, return_inverse=True)
        logits = pair_itm_logits(model, image_embeds[distinct], image_index, text_embeds[texts], text_masks[texts])
        scores.append(logits[:, 1].float())
        if bar is not None:
            bar.update(len(codes))
    return torch.cat(scores) if scores else torch.zeros(0, device=text_embeds.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RetrievalScores:
    """What the evaluation computed: score matrices [I, T] / [T, I] (on the CPU) and timings."""

    dataset: RetrievalDataset
    sims: torch.Tensor  # ITC similarity, image x text
    i2t: torch.Tensor  # ITM logit of each image's top-k texts, -100 elsewhere (ALBEF's score)
    t2i: torch.Tensor  # the same for each text's top-k images
    i2t_itm_itc: torch.Tensor  # ITM logit + ITC similarity (BLIP / LAVIS), -100 outside the top-k
    t2i_itm_itc: torch.Tensor
    num_pairs: int  # distinct pairs the fusion encoder scored
    time_encode_s: float
    time_rerank_s: float


@torch.no_grad()
def retrieval_scores(model, cfg, device: torch.device | str, split: str = "test") -> RetrievalScores:
    """Encode every image and caption of `split`, pick each query's `eval.k_test` candidates by
    ITC similarity and re-score them with the fusion encoder's ITM head.

    With a process group, each rank encodes a contiguous block of images and captions; caption
    states and all ITC features are gathered (uneven blocks allowed), image tokens stay on the
    rank that encoded them (in the autocast dtype on CUDA) and each rank re-scores the pairs of
    its own images, in fusion batches of max(k_test, eval.batch_size) pairs. Every rank returns
    the same matrices.
    """
    device = torch.device(device)
    dataset = RetrievalDataset(
        eval_files(cfg, split),
        cfg.eval.image_root,
        eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std),
        cfg.data.max_words,
    )
    images, texts = shard(len(dataset)), shard(len(dataset.texts))
    loader = DataLoader(
        Subset(dataset, range(images.start, images.stop)),
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        pin_memory=device.type == "cuda",
    )
    tokenizer = build_tokenizer(cfg.model)
    precision = cfg.train.precision
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        start = time.perf_counter()
        with inference_autocast(device, precision):
            with progress(images.stop - images.start, f"{split}: encode images", "img") as bar:
                image_embeds, image_feats = encode_images(model, loader, device, _storage_dtype(device, precision), bar)
            with progress(texts.stop - texts.start, f"{split}: encode captions", "txt") as bar:
                text_embeds, text_feats, text_masks = encode_texts(
                    model, tokenizer, dataset.texts[texts], cfg.eval.batch_size, cfg.eval.max_tokens, device, bar)
        text_feats, counts = gather_rows(text_feats)  # every caption's states, for every rank's images
        text_embeds, text_masks = (gather_rows(t, counts)[0] for t in (text_embeds, text_masks))
        image_feats = gather_rows(image_feats)[0]
        _sync(device)
        encoded = time.perf_counter()

        sims = image_feats @ text_feats.t()
        pairs, i2t_topk, t2i_topk = candidate_pairs(sims, cfg.eval.k_test)
        num_texts = len(dataset.texts)
        bounds = torch.tensor([images.start * num_texts, images.stop * num_texts], device=pairs.device)
        first, last = torch.searchsorted(pairs, bounds).tolist()
        mine = pairs[first:last]  # the pairs of this rank's images
        with inference_autocast(device, precision), progress(len(mine), f"{split}: ITM re-rank", "pair") as bar:
            scores = score_pairs(model, mine, num_texts, image_embeds, images.start, text_embeds, text_masks,
                                 max(cfg.eval.k_test, cfg.eval.batch_size), bar)
        del image_embeds, text_embeds
        scores = gather_rows(scores)[0]  # rank order = image order = the order of `pairs`
        # the dense score matrices live on the CPU (COCO: 4 x 0.5 GB)
        sims, pairs, scores, i2t_topk, t2i_topk = (t.cpu() for t in (sims, pairs, scores, i2t_topk, t2i_topk))
        i2t, i2t_plus = topk_matrix(sims, i2t_topk, pairs, scores, transpose=False)
        t2i, t2i_plus = topk_matrix(sims, t2i_topk, pairs, scores, transpose=True)
        _sync(device)
        reranked = time.perf_counter()
    finally:
        model.train(was_training)
    return RetrievalScores(dataset, sims, i2t, t2i, i2t_plus, t2i_plus, num_pairs=len(pairs),
                           time_encode_s=encoded - start, time_rerank_s=reranked - encoded)


@torch.no_grad()
def evaluate_retrieval(model, cfg, device: torch.device | str, split: str = "test") -> dict[str, float]:
    """ALBEF retrieval evaluation of `model` on the `split` files of `cfg.eval`.

    Returns the ITM re-ranked recalls (`txt_r1`, ..., `r_mean`, ALBEF's `itm_eval`, with
    `txt_ties` / `img_ties`: queries whose rank depends on the tie order), the same with
    ITM + ITC scores (`itm_itc_` prefix), the ITC-only recalls before re-ranking (`itc_`), the
    chance levels (`chance_`), `num_images`, `num_texts`, `num_pairs` (pairs re-scored by ITM)
    and the seconds spent encoding and re-ranking (`time_encode_s`, `time_rerank_s`).
    With `eval.save_examples` N > 0, rank 0 also writes picture grids of N text and N image
    queries to OUTPUT_DIR/examples/ and TensorBoard.
    """
    scores = retrieval_scores(model, cfg, device, split)
    dataset = scores.dataset
    result = retrieval_recall(scores.i2t, scores.t2i, dataset.txt2img, dataset.img2txt)
    for prefix, (a, b) in (("itm_itc_", (scores.i2t_itm_itc, scores.t2i_itm_itc)), ("itc_", (scores.sims, scores.sims.t()))):
        extra = retrieval_recall(a, b, dataset.txt2img, dataset.img2txt)
        result.update({f"{prefix}{key}": value for key, value in extra.items()})
    chance = chance_recall(dataset.img2txt, len(dataset.texts))
    result.update({f"chance_{key}": value for key, value in chance.items()})
    result.update(num_images=len(dataset.images), num_texts=len(dataset.texts), num_pairs=scores.num_pairs,
                  time_encode_s=scores.time_encode_s, time_rerank_s=scores.time_rerank_s)
    if cfg.eval.save_examples and get_rank() == 0:
        save_retrieval_examples(scores, cfg.eval.save_examples, Path(cfg.output_dir), split)
    return result


def format_table(result: Mapping[str, float]) -> str:
    """R@1/5/10 table (%) per direction: ITM re-ranked, ITM + ITC, ITC only and chance, and
    r_mean (the counts and times follow in albef.engine.results.format_results' last line), and
    the number of tied queries, when there are any."""
    def cell(key: str) -> str:
        return f"{result[key]:8.2f}" if key in result else f"{'':8s}"

    header = f"{'':15s}{'':15s}" + "".join(f"{f'R@{k}':>8s}" for k in RECALL_AT) + f"{'mean':>8s}"
    scores = (("ITM re-ranked", ""), ("ITM + ITC", "itm_itc_"), ("ITC only", "itc_"))
    lines = [header]
    for direction, key in (("text -> image", "img"), ("image -> text", "txt")):
        for label, prefix in scores + (("chance", "chance_"),):
            row = "".join(cell(f"{prefix}{key}_r{k}") for k in RECALL_AT) + cell(f"{prefix}{key}_r_mean")
            lines.append(f"{direction if not prefix else '':15s}{label:15s}{row}")
    for label, prefix in scores:  # r_mean: the mean of both directions' six recalls
        lines.append(f"{'r_mean' if not prefix else '':15s}{label:15s}{'':24s}{cell(f'{prefix}r_mean')}")
    if result.get("txt_ties") or result.get("img_ties"):  # only when recall depends on the tie order
        lines.append(f"ITM re-ranked queries with a negative tied at the positive's score (ranked in numpy's "
                     f"order, as ALBEF's itm_eval): text -> image {result['img_ties']}, "
                     f"image -> text {result['txt_ties']}")
    return "\n".join(line.rstrip() for line in lines)
