"""VQA fine-tuning and evaluation (ALBEF's VQA.py) on the shared engine.

    albef-vqa --config configs/vqa.yaml --init-from ALBEF_4M.pth           # fine-tune, then test
    albef-vqa --config configs/vqa.yaml --init-from ALBEF_VQA.pth --evaluate

Training: each question's distinct answers are scored by the answer decoder, weighted by
`count / #answers` (VQA) or `vqa.vg_weight` (VG). Evaluation: every question ranks the answer
list (`vqa.answer_list`, ALBEF's `rank_answer` with `vqa.k_test`); the predictions go to
`OUTPUT_DIR/vqa_result_{split}.json` in the official submission format
`[{"question_id": ..., "answer": ...}]`, and when the annotations carry human answers the
official VQA accuracy (`albef.metrics.vqa_accuracy`: `acc`, per answer type `acc_yes_no`,
`acc_number`, `acc_other`) is returned with the majority-answer baseline of the training files.

`--init-from` a pretraining checkpoint applies ALBEF's rule (answer decoder from the fusion
layers, `init_from_pretrain_state`); a VQA checkpoint (one with `text_decoder.*` keys) loads as it is.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from albef.config import Config, check_worker_decode
from albef.data.datasets import AnnotationError, build_eval_loader, build_train_loader, preflight_files, set_epoch
from albef.data.transforms import eval_transform, train_transform
from albef.data.vqa import VQACollator, VQAEvalDataset, VQATrainDataset, load_answer_list, load_questions
from albef.dist import DistInfo
from albef.engine.evaluation import eval_files, gather_lists, inference_autocast, progress, shard_subset, stoppable
from albef.metrics import vqa_accuracy
from albef.models import build_tokenizer, build_vqa_model
from albef.models.vqa import VQA_ADAPTER, VQAModel
from albef.tasks.base import Task, register_task


@dataclass
class VQAConfig:
    """VQA fine-tuning (albef-vqa): answer list, ranking and answer weights (ALBEF VQA.yaml/VQA.py)."""
    answer_list: str = "data/answer_list.json"  # JSON list of candidate answers ranked at evaluation
    k_test: int = 128                  # answers kept by first-token probability, then re-ranked
    count_first_token_twice: bool = True  # ALBEF's rank_answer; false: plain sequence likelihood
    eos: str = "[SEP]"                 # appended to every answer
    vg_weight: float = 0.5             # weight of a Visual Genome ("dataset": "vg") answer
    vg_root: str = ""                  # image root of "vg" entries (empty: data.image_root)
    eval_max_words: int = 50           # question words kept at evaluation (training: data.max_words)


def majority_answer(files: Sequence[str]) -> str | None:
    """The most frequent answer of the training questions (each question's most common human answer)."""
    counts = Counter(Counter(e["answer"]).most_common(1)[0][0] for e in load_questions(files, need_answers=True))
    return counts.most_common(1)[0][0] if counts else None


@register_task("vqa", help="VQA fine-tuning and evaluation (answer generation)")
class VQATask(Task):
    name = "vqa"
    best_metric = "acc"
    weight_adapter = VQA_ADAPTER  # ALBEF VQA.py's decoder rule (albef/models/vqa.py)
    description = "ALBEF VQA fine-tuning and evaluation"
    config_section, config_class = "vqa", VQAConfig
    config_ranges = {"k_test": "[1, inf)", "vg_weight": "[0, inf)", "eval_max_words": "[1, inf)"}

    def __init__(self) -> None:
        self.loader: DataLoader | None = None
        self._majority: dict[tuple[str, ...], str | None] = {}

    def check(self, cfg: Config, training: bool = True) -> None:
        """Before anything is built: every question file and the answer list are well-formed
        (an AnnotationError is one line naming the file and entry)."""
        if training:
            check_worker_decode(cfg, "albef-vqa")
            load_questions(cfg.data.train_files, need_answers=True)
        roots = {"vqa": cfg.eval.image_root, "vg": cfg.vqa.vg_root or cfg.eval.image_root}
        for key in ("val_files", "test_files"):  # every image: an answer needs its image
            preflight_files(getattr(cfg.eval, key), lambda f: load_questions(f, need_answers=False),
                            lambda e: [os.path.join(roots[e.get("dataset", "vqa")], e["image"])], "",
                            f"eval.{key}", 0.0)
        if cfg.eval.val_files or cfg.eval.test_files:
            load_answer_list(cfg.vqa.answer_list)

    # ----------------------------------------------------------------------------- training

    def build_model(self, cfg: Config) -> nn.Module:
        return build_vqa_model(cfg.model)

    def build_train_loader(self, cfg: Config, dist: DistInfo, epoch: int, consumed: int
                           ) -> tuple[Iterable[dict[str, Any]], int]:
        if self.loader is None:
            d = cfg.data
            transform = train_transform(cfg.model.vision.image_size, d.mean, d.std, d.crop_scale,
                                        d.randaugment, d.hflip)
            dataset = VQATrainDataset(d.train_files, d.image_root, cfg.vqa.vg_root or d.image_root, transform,
                                      d.max_words, cfg.vqa.eos, cfg.vqa.vg_weight, cfg.seed)
            self.loader = build_train_loader(
                dataset, VQACollator(build_tokenizer(cfg.model), d.max_tokens), batch_size=cfg.train.batch_size,
                num_workers=d.num_workers, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
        set_epoch(self.loader, epoch, consumed)
        return self.loader, len(self.loader.dataset) // dist.world_size // cfg.train.batch_size

    def forward_step(self, model: nn.Module, batch: dict[str, Any], alpha: float) -> dict[str, Any]:
        return model(batch["images"], batch["question_ids"], batch["question_mask"], batch["answer_ids"],
                     batch["answer_mask"], batch["answer_weights"], batch["answers_per_question"], alpha=alpha)

    def find_unused_parameters(self, cfg: Config) -> bool:
        return False

    # ----------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, model: VQAModel, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        files = eval_files(cfg, split)
        if not files:
            return {}
        results = answer_questions(getattr(model, "module", model), cfg, files, dist)
        metrics: dict[str, float] = {"num_questions": float(len(results))}
        if dist.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, f"vqa_result_{split}.json"), "w", encoding="utf-8") as fp:
                json.dump(results, fp)
        annotations = load_questions(files, need_answers=False)
        scored = vqa_accuracy(results, annotations)
        if scored:
            metrics.update(scored)
            key = tuple(cfg.data.train_files)
            if key not in self._majority:  # --evaluate may run without the training files
                have_files = key and all(os.path.isfile(f) for f in key)
                self._majority[key] = majority_answer(key) if have_files else None
            majority = self._majority[key]
            if majority is not None:
                baseline = [{"question_id": r["question_id"], "answer": majority} for r in results]
                metrics["majority_acc"] = vqa_accuracy(baseline, annotations)["acc"]
        return metrics


@torch.no_grad()
def answer_questions(model: VQAModel, cfg: Config, files: Sequence[str], dist: DistInfo) -> list[dict]:
    """`[{"question_id", "answer"}]` for every question of `files`, in file order (all ranks
    answer a contiguous share; every rank gets the whole list)."""
    device = next(model.parameters()).device
    tokenizer = build_tokenizer(cfg.model)
    answer_list = load_answer_list(cfg.vqa.answer_list)
    answers = tokenizer([a + cfg.vqa.eos for a in answer_list], padding="longest", return_tensors="pt").to(device)
    dataset = VQAEvalDataset(files, cfg.eval.image_root, cfg.vqa.vg_root or cfg.eval.image_root,
                             eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std),
                             cfg.vqa.eval_max_words)
    share = shard_subset(dataset)
    max_tokens = model.text_encoder.config.max_position_embeddings
    loader = build_eval_loader(share, VQACollator(tokenizer, max_tokens), batch_size=cfg.eval.batch_size,
                               num_workers=cfg.eval.num_workers)
    results = []
    with inference_autocast(device, cfg.train.precision), progress(len(share), "vqa: answer", "question") as bar:
        for batch in stoppable(loader, len(loader)):
            if batch["skipped"]:
                raise AnnotationError(f"{', '.join(files)}: evaluation images could not be read "
                                      f"({batch['skipped']}); check eval.image_root and the 'image' paths")
            images = batch["images"].to(device)
            question_ids, question_mask = batch["question_ids"].to(device), batch["question_mask"].to(device)
            states = model.encode_question(images, question_ids, question_mask)
            ranked, _ = model.rank_answers(states, question_mask, answers["input_ids"], answers["attention_mask"],
                                           cfg.vqa.k_test, cfg.vqa.count_first_token_twice)
            results += [{"question_id": qid, "answer": answer_list[int(i)]}
                        for qid, i in zip(batch["question_id"], ranked[:, 0].tolist())]
            bar.update(len(batch["question_id"]))
    return gather_lists(results)


def main(argv: Sequence[str] | None = None) -> int:
    return VQATask.main(argv, "albef-vqa")


if __name__ == "__main__":
    sys.exit(main())
