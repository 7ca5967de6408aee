"""Image-text retrieval: fine-tuning (COCO, Flickr30K) and evaluation, as ALBEF's `Retrieval.py`.

    albef-retrieval --config configs/retrieval_coco.yaml --init-from ALBEF_4M.pth --output-dir DIR
    albef-retrieval --config configs/retrieval_coco.yaml --init-from DIR/best.pt --evaluate

Training runs on the engine as pretraining does, with the retrieval model: no MLM head, ITC whose
positives are every caption of the same image (in the batch and in the queue), ITM with hard
negatives that never share the image. Evaluation: every image and caption is encoded once, the
ITC similarity picks the `k_test` best candidates of each query, and the fusion encoder's ITM
logit (positive class) replaces their score (ALBEF; `itm_itc_` results add the ITC similarity as
BLIP and LAVIS report); everything outside the top-k scores -100.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from albef.checkpoint import LoadReport, load_weights
from albef.cli import run_task
from albef.config import Config, ConfigError
from albef.data.captions import pre_caption
from albef.data.datasets import SampleError, load_annotations, read_image
from albef.data.transforms import eval_transform
from albef.dist import DistInfo, get_rank, get_world_size, is_distributed
from albef.engine.trainer import QUEUE_KEYS
from albef.models import build_model, build_tokenizer
from albef.tasks.pretrain import PretrainTask, unwrap

RECALL_AT = (1, 5, 10)
# Weights of a pretraining checkpoint the retrieval model has no use for: the MLM heads.
UNUSED_FOR_RETRIEVAL = ("text_encoder.cls", "text_encoder_m.cls")


class RetrievalTask(PretrainTask):
    """ALBEF's retrieval model on the engine: the pretraining step without MLM, image ids as
    positives; evaluation on eval.val_files / eval.test_files; best.pt by mean recall."""

    best_metric = "r_mean"

    def check(self, cfg: Config, training: bool = True) -> None:
        """Before anything is built: the config suits the retrieval model and every annotation
        file it will read is well-formed."""
        if cfg.loss.weights.mlm:
            raise ConfigError("loss.weights.mlm: retrieval fine-tuning has no MLM term (ALBEF's retrieval model); "
                              "set loss.weights.mlm=0")
        super().check(cfg, training)  # caption files, as pretraining's

    def init_weights(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
        """ALBEF's rule (Retrieval.py): every key of a pretraining or retrieval checkpoint, the
        position embeddings of both ViTs resampled, the MLM heads dropped. The feature queues
        are taken as they are; the image ids of a pretraining queue belong to another data set,
        so they are dropped and the queue's ids start unknown (never positives)."""
        pretraining = any(k.startswith(UNUSED_FOR_RETRIEVAL) for k in state)
        unused = list(UNUSED_FOR_RETRIEVAL) + (["idx_queue"] if pretraining else [])
        return load_weights(model, state, source, unused=unused, new=QUEUE_KEYS)

    def evaluate(self, model: nn.Module, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        return evaluate_retrieval(unwrap(model), cfg, dist.device, split)

    def find_unused_parameters(self, cfg: Config) -> bool:
        return min(cfg.loss.weights.itc, cfg.loss.weights.itm) == 0


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
            raise RetrievalDataError(f"eval image {e.detail} ({e.reason}); check eval.image_root / eval.*_files") from e
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
def rerank(sims: torch.Tensor, k: int, pair_scores, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM re-ranking of each row's top-k candidates (by `sims`).

    `pair_scores(rows, cols)` returns ITM scores of the (row, col) pairs. Returns two score
    matrices, -100 outside each row's top-k: the ITM score alone (ALBEF) and the ITM score plus
    the ITC similarity (BLIP / LAVIS). Rows are split across ranks when a process group exists
    and summed back.
    """
    k = min(k, sims.size(1))
    rows = _rank_slice(sims.size(0))
    itm = torch.zeros_like(sims)
    itm_itc = torch.zeros_like(sims)
    itm[rows] = -100.0
    itm_itc[rows] = -100.0
    topk = sims[rows].topk(k, dim=1).indices
    row_idx = torch.arange(rows.start, rows.stop, device=sims.device).repeat_interleave(k)
    col_idx = topk.flatten()
    for start in range(0, row_idx.numel(), batch_size):
        r, c = row_idx[start : start + batch_size], col_idx[start : start + batch_size]
        score = pair_scores(r, c).float()
        itm[r, c] = score
        itm_itc[r, c] = score + sims[r, c]
    if is_distributed():
        dist.all_reduce(itm)
        dist.all_reduce(itm_itc)
    return itm, itm_itc


def eval_files(cfg, split: str) -> list[str]:
    """The annotation files of `split` ("val" or "test")."""
    return {"val": cfg.eval.val_files, "test": cfg.eval.test_files}[split]


@torch.no_grad()
def evaluate_retrieval(model, cfg, device: torch.device | str, split: str = "test") -> dict[str, float]:
    """ALBEF retrieval evaluation of `model` on the `split` files of `cfg.eval`.

    Returns the ITM re-ranked recalls (`txt_r1`, ..., `r_mean`, ALBEF's score), the same with
    ITM + ITC scores (`itm_itc_` prefix), the ITC-only recalls before re-ranking (`itc_`), the
    chance levels (`chance_`), `num_images`, `num_texts`.
    """
    device = torch.device(device)
    dataset = RetrievalDataset(
        eval_files(cfg, split),
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
            model, tokenizer, dataset.texts, cfg.eval.batch_size, cfg.eval.max_tokens, device
        )
        image_embeds, image_feats = encode_images(model, loader, device)
        sims = image_feats @ text_feats.t()

        def itm(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            return model.itm_logits(image_embeds[img_idx], text_embeds[txt_idx], text_masks[txt_idx])[:, 1]

        k, bs = cfg.eval.k_test, cfg.eval.batch_size
        i2t, i2t_plus = rerank(sims, k, itm, bs)
        t2i, t2i_plus = rerank(sims.t(), k, lambda t, i: itm(i, t), bs)
    model.train(was_training)

    result = itm_eval(i2t.cpu(), t2i.cpu(), dataset.txt2img, dataset.img2txt)
    for prefix, (a, b) in (("itm_itc_", (i2t_plus, t2i_plus)), ("itc_", (sims, sims.t()))):
        extra = itm_eval(a.cpu(), b.cpu(), dataset.txt2img, dataset.img2txt)
        result.update({f"{prefix}{key}": value for key, value in extra.items()})
    chance = chance_recall(dataset.img2txt, len(dataset.texts))
    result.update({f"chance_{key}": value for key, value in chance.items()})
    result.update(num_images=len(dataset.images), num_texts=len(dataset.texts))
    return result


def format_table(result: Mapping[str, float]) -> str:
    """R@1/5/10 table per direction: ITM re-ranked, ITC only and chance."""
    header = f"{'':15s}{'':15s}" + "".join(f"{f'R@{k}':>8s}" for k in RECALL_AT)
    lines = [header]
    for direction, key in (("text -> image", "img"), ("image -> text", "txt")):
        for label, prefix in (("ITM re-ranked", ""), ("ITM + ITC", "itm_itc_"), ("ITC only", "itc_"),
                              ("chance", "chance_")):
            row = "".join(f"{result[f'{prefix}{key}_r{k}']:8.2f}" for k in RECALL_AT)
            lines.append(f"{direction if not prefix else '':15s}{label:15s}{row}")
    lines.append(f"{result['num_images']} images, {result['num_texts']} captions, r_mean {result['r_mean']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`albef-retrieval --config CFG [--init-from PATH] [--evaluate] [...]`; see albef/cli.py."""
    return run_task(RetrievalTask, argv, "albef-retrieval", "ALBEF image-text retrieval: fine-tuning and evaluation")


if __name__ == "__main__":
    sys.exit(main())
