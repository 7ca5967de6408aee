"""VQA data (ALBEF's `vqa_dataset`): question files, answer weights, the answer list (the VQA
accuracy is `albef.metrics.vqa_accuracy`).

Annotation files are JSON lists of::

    {"question_id": 262148000, "question": "Where is he looking?", "image": "val2014/COCO_val2014_000000262148.jpg",
     "answer": ["down", "down", "at table", ...], "dataset": "vqa"}

`answer` is the list of human answers (VQA: 10; VG: one string or a one-element list); test
files may leave it out. An optional `answer_type` (VQA v2: "yes/no", "number", "other") adds
the accuracy per answer type. `image` is relative to the image root (`vg` entries: to the VG root).
The answer list file is a JSON list of candidate answer strings (ALBEF: the 3,128 most frequent).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from .datasets import AnnotationError, BadSample, EpochDataset, SampleError, read_image, sample_seed

DATASETS = ("vqa", "vg")


def pre_question(question: str, max_words: int) -> str:
    """ALBEF's question cleaning: lower case, drop punctuation, split '-' and '/', at most `max_words` words."""
    question = re.sub(r"([,.'!?\"()*#:;~])", "", question.lower()).replace("-", " ").replace("/", " ")
    words = question.rstrip(" ").split(" ")
    return " ".join(words[:max_words])


def answer_weights(entry: dict, vg_weight: float = 0.5) -> tuple[list[str], list[float]]:
    """The distinct answers of a training entry and their weights, as ALBEF.

    VQA: each distinct human answer weighs (its count) / (number of human answers). VG: the one
    answer weighs `vg_weight` (0.5).
    """
    answers = entry["answer"]
    if entry.get("dataset", "vqa") == "vg":
        return [answers if isinstance(answers, str) else answers[0]], [vg_weight]
    counts = Counter(answers)
    return list(counts), [n / len(answers) for n in counts.values()]


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fp:
            return json.load(fp)
    except FileNotFoundError as exn:
        raise AnnotationError(f"{path}: {what} not found") from exn
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise AnnotationError(f"{path}: not a valid UTF-8 JSON file ({exn})") from exn


def load_answer_list(path: str) -> list[str]:
    """The candidate answers (a JSON list of distinct non-empty strings)."""
    answers = _read_json(path, "answer list (vqa.answer_list) file")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise AnnotationError(f"{path}: the answer list must be a non-empty JSON list of non-empty strings")
    if len(set(answers)) != len(answers):
        dup = next(a for a, n in Counter(answers).items() if n > 1)
        raise AnnotationError(f"{path}: answer {dup!r} is listed twice; list each candidate answer once")
    return answers


def load_questions(files: str | Sequence[str], need_answers: bool) -> list[dict]:
    """Read and check VQA annotation files (format in the module docstring)."""
    files = [files] if isinstance(files, str) else list(files)
    entries = []
    for path in files:
        data = _read_json(path, "VQA annotation file")
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("question"), str) \
                    or not isinstance(entry.get("image"), str):
                raise AnnotationError(f"{where}: needs 'question' and 'image' strings")
            if entry.get("dataset", "vqa") not in DATASETS:
                raise AnnotationError(f"{where}: 'dataset' must be one of {DATASETS}, got {entry['dataset']!r}")
            answers = entry.get("answer")
            answers = [answers] if isinstance(answers, str) else answers
            if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
                raise AnnotationError(f"{where}: 'answer' must be a string or a list of strings")
            if not isinstance(entry.get("answer_type", ""), str):
                raise AnnotationError(f"{where}: 'answer_type' must be a string such as \"yes/no\", \"number\" or \"other\"")
            if need_answers and not answers:
                raise AnnotationError(f"{where}: training questions need a non-empty 'answer' list")
            if "question_id" not in entry and not need_answers:
                raise AnnotationError(f"{where}: evaluation questions need a 'question_id'")
            entries.append({**entry, "answer": answers})
    return entries


class _VQAImages(EpochDataset):
    def __init__(self, entries: list[dict], image_root: str, vg_root: str, transform, seed: int):
        super().__init__(entries, transform, seed)
        self.roots = {"vqa": image_root, "vg": vg_root}

    def _image(self, index: int) -> torch.Tensor | BadSample:
        entry = self.samples[index]
        try:
            image = read_image(os.path.join(self.roots[entry.get("dataset", "vqa")], entry["image"]))
        except SampleError as exn:
            return BadSample(exn.reason, index, exn.detail)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch.get(), index))
            return self.transform(image)


class VQATrainDataset(_VQAImages):
    """Samples `{image, question, answers, weights, index}` (answers end with `eos`, as ALBEF)."""

    def __init__(self, files, image_root: str, vg_root: str, transform, max_words: int = 30,
                 eos: str = "[SEP]", vg_weight: float = 0.5, seed: int = 0):
        super().__init__(load_questions(files, need_answers=True), image_root, vg_root, transform, seed)
        self.max_words, self.eos, self.vg_weight = max_words, eos, vg_weight

    def __getitem__(self, index: int) -> dict | BadSample:
        image = self._image(index)
        if isinstance(image, BadSample):
            return image
        entry = self.samples[index]
        answers, weights = answer_weights(entry, self.vg_weight)
        return {
            "image": image,
            "question": pre_question(entry["question"], self.max_words),
            "answers": [a + self.eos for a in answers],
            "weights": weights,
            "index": index,
        }


class VQAEvalDataset(_VQAImages):
    """Samples `{image, question, question_id, index}` in file order (ALBEF: at most 50 words)."""

    def __init__(self, files, image_root: str, vg_root: str, transform, max_words: int = 50):
        super().__init__(load_questions(files, need_answers=False), image_root, vg_root, transform, seed=0)
        self.max_words = max_words

    def __getitem__(self, index: int) -> dict | BadSample:
        image = self._image(index)
        if isinstance(image, BadSample):
            return image
        entry = self.samples[index]
        return {"image": image, "question": pre_question(entry["question"], self.max_words),
                "question_id": entry["question_id"], "index": index}


class VQACollator:
    """Picklable collate: drop bad samples (counted in `skipped`), tokenise questions and answers.

    Batch: `images` [B,3,H,W], `question_ids`/`question_mask` [B,L], and for training
    `answer_ids`/`answer_mask` [A,La] (the answers of all questions, in order),
    `answer_weights` [A], `answers_per_question` [B]; for evaluation `question_id` (list);
    `index` [B] dataset indices and `skipped` {reason: count} as the caption `Collator`.
    """

    def __init__(self, tokenizer, max_tokens: int | None):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, samples: Sequence[dict | BadSample]) -> dict:
        good = [s for s in samples if not isinstance(s, BadSample)]
        batch: dict[str, Any] = {"skipped": dict(Counter(s.reason for s in samples if isinstance(s, BadSample))),
                                 "index": torch.tensor([s["index"] for s in good], dtype=torch.long)}
        if not good:
            return {**batch, "images": torch.zeros(0, 3, 0, 0)}
        questions = self.tokenizer([s["question"] for s in good], padding="longest", return_tensors="pt",
                                   truncation=self.max_tokens is not None, max_length=self.max_tokens)
        batch.update(images=torch.stack([s["image"] for s in good]),
                     question_ids=questions["input_ids"], question_mask=questions["attention_mask"])
        if "answers" in good[0]:
            answers = self.tokenizer([a for s in good for a in s["answers"]], padding="longest", return_tensors="pt")
            batch.update(answer_ids=answers["input_ids"], answer_mask=answers["attention_mask"],
                         answer_weights=torch.tensor([w for s in good for w in s["weights"]]),
                         answers_per_question=torch.tensor([len(s["answers"]) for s in good]))
        else:
            batch["question_id"] = [s["question_id"] for s in good]
        return batch
