"""Image-text retrieval evaluation: ITC ranking, ITM re-ranking of the top-k, R@1/5/10.

Follows ALBEF's `Retrieval.py`: every image and caption is encoded once, the ITC similarity
picks the `k_test` best candidates of each query, and the fusion encoder's ITM logit
(positive class) replaces their score; everything outside the top-k scores -100.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import nullcontext
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from albef.checkpoint import CheckpointError, checkpoint_dir, find_latest, load_pretrained
from albef.config import ConfigError, load_config
from albef.data.captions import pre_caption
from albef.data.datasets import AnnotationError, SampleError, load_annotations, read_image
from albef.data.transforms import eval_transform
from albef.dist import destroy_distributed, get_rank, get_world_size, init_distributed, is_distributed
from albef.models import build_model, build_tokenizer

RECALL_AT = (1, 5, 10)
# Weights retrieval evaluation never uses: the MLM heads (released ALBEF retrieval checkpoints
# have none). Everything else in a checkpoint must match the model.
UNUSED_FOR_RETRIEVAL = ("text_encoder.cls", "text_encoder_m.cls")


class RetrievalDataError(RuntimeError):
    """An evaluation image cannot be read (retrieval needs every image of the test set)."""


class RetrievalDataset(Dataset):
    """Images of ALBEF annotation files (`{"image": path, "caption": str | [str, ...]}`).

    Captions of one image (same image id) are grouped. `texts` holds the cleaned captions,
    `txt2img[t]` the image of caption t and `img2txt[i]` the captions of image i.
    """

    def __init__(self, files: Sequence[str], image_root: str, transform, max_words: int):
        by_image: dict[int, list[dict]] = {}
        for sample in load_annotations(files):
            by_image.setdefault(sample["id"], []).append(sample)
        self.image_root = image_root
        self.transform = transform
        self.images = [samples[0]["image"] for samples in by_image.values()]
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for img_idx, samples in enumerate(by_image.values()):
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(samples))))
            self.txt2img += [img_idx] * len(samples)
            self.texts += [pre_caption(s["caption"], max_words) for s in samples]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            image = read_image(os.path.join(self.image_root, self.images[index]))
        except SampleError as e:
            raise RetrievalDataError(f"eval image {e.detail} ({e.reason}); check eval.image_root / eval.files") from e
        return self.transform(image)


def _ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank of the best-scored positive in each row: how many negatives score at least as high.

    Ties count against the query, so candidates left at the -100 floor never earn a hit.
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positive).sum(dim=1)


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks < k).float().mean().item()


def itm_eval(
    scores_i2t,
    scores_t2i,
    txt2img: Sequence[int] | Mapping[int, int],
    img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
) -> dict[str, float]:
    """Recall@{1,5,10} for image->text (`txt_r*`) and text->image (`img_r*`), as in ALBEF.

    An image query is a hit when any of its captions is within the top K.
    """
    scores_i2t = torch.as_tensor(scores_i2t, dtype=torch.float32)
    scores_t2i = torch.as_tensor(scores_t2i, dtype=torch.float32)
    num_images, num_texts = scores_i2t.shape
    i2t_pos = torch.zeros(num_images, num_texts, dtype=torch.bool)
    for img, txts in enumerate(img2txt[i] for i in range(num_images)):
        i2t_pos[img, list(txts)] = True
    t2i_pos = torch.zeros(num_texts, num_images, dtype=torch.bool)
    t2i_pos[torch.arange(num_texts), torch.tensor([txt2img[t] for t in range(num_texts)])] = True

    txt_ranks, img_ranks = _ranks(scores_i2t, i2t_pos), _ranks(scores_t2i, t2i_pos)
    result = {f"txt_r{k}": _recall(txt_ranks, k) for k in RECALL_AT}
    result["txt_r_mean"] = sum(result[f"txt_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    result.update({f"img_r{k}": _recall(img_ranks, k) for k in RECALL_AT})
    result["img_r_mean"] = sum(result[f"img_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def chance_recall(img2txt: Sequence[Sequence[int]], num_texts: int) -> dict[str, float]:
    """Expected recall of a random ranking, keyed like `itm_eval`.

    Text->image: K / num_images. Image->text: the chance that a random top K of the
    `num_texts` captions holds at least one of the image's c captions, 1 - C(T-c, K) / C(T, K).
    """
    num_images = len(img2txt)
    result = {}
    for k in RECALL_AT:
        top = min(k, num_texts)
        miss = [math.comb(num_texts - len(t), top) / math.comb(num_texts, top) for t in img2txt]
        result[f"txt_r{k}"] = 100.0 * (1.0 - sum(miss) / num_images)
        result[f"img_r{k}"] = 100.0 * min(k, num_images) / num_images
    return result


def _autocast(device: torch.device, precision: str):
    """Autocast for inference on CUDA (bf16 unless the config asks for fp16 or fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int, device):
    """Unimodal text tokens, normalised ITC features and attention masks of all captions."""
    embeds, feats, masks = [], [], []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(
            list(texts[start : start + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        ).to(device)
        embed, feat = model.text_tokens(tokens.input_ids, tokens.attention_mask)
        embeds.append(embed)
        feats.append(feat.float())
        masks.append(tokens.attention_mask)
    return torch.cat(embeds), torch.cat(feats), torch.cat(masks)


@torch.no_grad()
def encode_images(model, loader: DataLoader, device):
    """Patch tokens and normalised ITC features of all images."""
    embeds, feats = [], []
    for images in loader:
        embed, feat = model.image_tokens(images.to(device, non_blocking=True))
        embeds.append(embed)
        feats.append(feat.float())
    return torch.cat(embeds), torch.cat(feats)


def _rank_slice(num_rows: int) -> slice:
    """Contiguous block of query rows re-ranked by this process."""
    step = math.ceil(num_rows / get_world_size())
    start = min(num_rows, get_rank() * step)
    return slice(start, min(num_rows, start + step))


@torch.no_grad()
def rerank(sims: torch.Tensor, k: int, pair_scores, batch_size: int) -> torch.Tensor:
    """Score matrix with each row's top-k candidates (by `sims`) scored by `pair_scores`.

    `pair_scores(rows, cols)` returns ITM scores of the (row, col) pairs. Other entries are
    -100. Rows are split across ranks when a process group exists and summed back.
    """
    k = min(k, sims.size(1))
    rows = _rank_slice(sims.size(0))
    scores = torch.zeros_like(sims)
    scores[rows] = -100.0
    topk = sims[rows].topk(k, dim=1).indices
    row_idx = torch.arange(rows.start, rows.stop, device=sims.device).repeat_interleave(k)
    col_idx = topk.flatten()
    for start in range(0, row_idx.numel(), batch_size):
        r, c = row_idx[start : start + batch_size], col_idx[start : start + batch_size]
        scores[r, c] = pair_scores(r, c).float()
    if is_distributed():
        dist.all_reduce(scores)
    return scores


@torch.no_grad()
def evaluate_retrieval(model, cfg, device: torch.device | str) -> dict[str, float]:
    """ALBEF retrieval evaluation of `model` on `cfg.eval.files`.

    Returns the re-ranked recalls (`txt_r1`, ..., `r_mean`), the ITC-only recalls before
    re-ranking (`itc_` prefix), the chance levels (`chance_` prefix), `num_images`, `num_texts`.
    """
    device = torch.device(device)
    dataset = RetrievalDataset(
        cfg.eval.files,
        cfg.eval.image_root,
        eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std),
        cfg.data.max_words,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        pin_memory=device.type == "cuda",
    )
    tokenizer = build_tokenizer(cfg)
    was_training = model.training
    model.eval()
    with _autocast(device, cfg.train.precision):
        text_embeds, text_feats, text_masks = encode_texts(
            model, tokenizer, dataset.texts, cfg.eval.batch_size, cfg.data.max_tokens, device
        )
        image_embeds, image_feats = encode_images(model, loader, device)
        sims = image_feats @ text_feats.t()

        def itm(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            return model.itm_logits(image_embeds[img_idx], text_embeds[txt_idx], text_masks[txt_idx])[:, 1]

        k, bs = cfg.eval.k_test, cfg.eval.batch_size
        scores_i2t = rerank(sims, k, itm, bs)
        scores_t2i = rerank(sims.t(), k, lambda t, i: itm(i, t), bs)
    model.train(was_training)

    result = itm_eval(scores_i2t.cpu(), scores_t2i.cpu(), dataset.txt2img, dataset.img2txt)
    itc = itm_eval(sims.cpu(), sims.t().cpu(), dataset.txt2img, dataset.img2txt)
    result.update({f"itc_{key}": value for key, value in itc.items()})
    chance = chance_recall(dataset.img2txt, len(dataset.texts))
    result.update({f"chance_{key}": value for key, value in chance.items()})
    result.update(num_images=len(dataset.images), num_texts=len(dataset.texts))
    return result


def format_table(result: Mapping[str, float]) -> str:
    """R@1/5/10 table per direction: ITM re-ranked, ITC only and chance."""
    header = f"{'':15s}{'':15s}" + "".join(f"{f'R@{k}':>8s}" for k in RECALL_AT)
    lines = [header]
    for direction, key in (("text -> image", "img"), ("image -> text", "txt")):
        for label, prefix in (("ITM re-ranked", ""), ("ITC only", "itc_"), ("chance", "chance_")):
            row = "".join(f"{result[f'{prefix}{key}_r{k}']:8.2f}" for k in RECALL_AT)
            lines.append(f"{direction if not prefix else '':15s}{label:15s}{row}")
    lines.append(f"{result['num_images']} images, {result['num_texts']} captions, r_mean {result['r_mean']:.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="albef-retrieval", description="ALBEF image-text retrieval evaluation")
    parser.add_argument("--config", required=True, help="YAML config; eval.* selects the data")
    parser.add_argument("--checkpoint", help="our checkpoint or a released ALBEF .pth (default: newest in the run)")
    parser.add_argument("--output-dir", help="run whose newest checkpoint is evaluated (default: output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`albef-retrieval --config CFG [--checkpoint PATH | --output-dir RUN] [key.sub=value ...]`.

    Exit codes: 0 done, 2 bad config, arguments or checkpoint.
    """
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.eval.files:
            raise ConfigError(f"{args.config}: eval.files is empty; list the retrieval annotation files")
        run_ckpts = checkpoint_dir(args.output_dir or cfg.output_dir)
        checkpoint = args.checkpoint or find_latest(run_ckpts)
        if checkpoint is None:
            raise CheckpointError(f"no checkpoint in {run_ckpts}; pass --checkpoint PATH or the --output-dir of a run")
        model = build_model(cfg)
        report = load_pretrained(model, checkpoint, skip=UNUSED_FOR_RETRIEVAL)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    info = init_distributed()
    try:
        result = evaluate_retrieval(model.to(info.device), cfg, info.device)
    except (AnnotationError, RetrievalDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    if info.rank == 0:
        print(report)
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
