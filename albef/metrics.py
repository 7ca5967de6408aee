"""Every task's evaluation metric, as plain functions of lists and arrays.

The figures equal those of the official evaluation code, so they can be compared with papers:

* `vqa_accuracy`: the VQA accuracy of the official VQA toolkit (GT-Vision-Lab/VQA
  `vqaEval.py`, the current version with its 2021 fix): answer
  normalisation, the average over the leave-one-annotator-out subsets, per answer type.
* `retrieval_recall`: R@1/5/10 both ways and their means, equal to ALBEF's `itm_eval` on any score
  matrix, tied scores included (the same `np.argsort`), plus how many queries had a tie.
* `grounding_accuracy`, `score_boxes`, `pick_box`, `box_iou`: ALBEF's `grounding_eval`.
* `classification_accuracy`: SNLI-VE and NLVR2.
* `topk_accuracy`, `per_class_accuracy`, `confusion_matrix`: zero-shot classification.

Score your own predictions with them::

    from albef.metrics import vqa_accuracy, retrieval_recall, grounding_accuracy
    vqa_accuracy([{"question_id": 1, "answer": "two"}], [{"question_id": 1, "answer": ["2"] * 10}])
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- classification


def classification_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percentage of predictions equal to their label (0 for no labels)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return 100.0 * sum(int(p == y) for p, y in zip(predictions, labels)) / max(len(labels), 1)


# ----------------------------------------------------------------------------- VQA
# The normalisation tables of the official vqaEval.py, entry for entry (keys it can never meet
# after lower-casing, such as "Im", included as it has them).

VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!")
# A comma between digits ("1,000"): then every punctuation mark is deleted rather than spaced.
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern, quirk included: "(?!<=\d)" is a lookahead for the text "<=" and a digit (a
# mistyped lookbehind), so it never fires and every period not followed by a digit goes ("2.5" stays).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# vqaEval passes re.UNICODE (32) as `count` of `sub`: at most 32 periods are removed.
_PERIOD_COUNT = 32
VQA_ANSWER_TYPES = ("yes/no", "number", "other")


def vqa_punctuation(text: str) -> str:
    """vqaEval's `processPunctuation`: each mark of VQA_PUNCTUATION is deleted when the input has it
    next to a space or has a comma between digits, else replaced by a space; then periods not
    followed by a digit are deleted."""
    out = text
    delete = _DIGIT_COMMA.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def vqa_digits_articles(text: str) -> str:
    """vqaEval's `processDigitArticle`: lower case, split on whitespace, number words to digits,
    articles dropped, contractions restored ("dont" -> "don't"), joined by single spaces."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_normalize(text: str) -> str:
    """Both normalisation steps, as vqaEval applies them to an answer."""
    return vqa_digits_articles(vqa_punctuation(text))


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction, in [0, 1].

    Newlines and tabs become spaces and the ends are stripped (prediction and human answers).
    When the human answers are not all identical, all of them and the prediction are normalised
    (`vqa_normalize`); when they are, nothing more is done (the toolkit's quirk). The score
    averages min(#matching humans / 3, 1) over the leave-one-annotator-out subsets: each of
    the n annotators is left out once (n = 10 in VQA: 1, 2, 3 matching humans give 0.3, 0.6, 0.9).
    """
    if not human_answers:
        raise ValueError("a VQA score needs at least one human answer")
    humans = [_strip_whitespace(a) for a in human_answers]
    prediction = _strip_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [vqa_normalize(a) for a in humans]
        prediction = vqa_normalize(prediction)
    matches = sum(a == prediction for a in humans)
    # Leaving out a matching annotator leaves matches - 1 matching ones, any other leaves matches.
    return sum(min(1.0, (matches - (a == prediction)) / 3) for a in humans) / len(humans)


def _answer_type_key(answer_type: str) -> str:
    return re.sub(r"\W+", "_", answer_type).strip("_")


def vqa_accuracy(predictions: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]]
                 ) -> dict[str, float]:
    """Official VQA accuracy (%) of `[{"question_id", "answer"}]` against annotations
    `[{"question_id", "answer": [human answers], "answer_type"?}]`.

    Scores every prediction whose question has human answers. Returns `acc` (the toolkit's
    "overall", not rounded) and `num_scored`, and for annotations that carry `answer_type`
    (`yes/no`, `number`, `other` in VQA v2) `acc_yes_no`, `acc_number`, `acc_other` with their
    counts `num_yes_no`, ... (the toolkit's "perAnswerType"). Empty when nothing can be scored
    (e.g. the VQA test-dev split, which has no answers).
    """
    truth = {a["question_id"]: a for a in annotations if a.get("answer")}
    scores: list[float] = []
    by_type: dict[str, list[float]] = {}
    for pred in predictions:
        ann = truth.get(pred["question_id"])
        if ann is None:
            continue
        answers = ann["answer"]
        score = vqa_score(pred["answer"], [answers] if isinstance(answers, str) else answers)
        scores.append(score)
        if ann.get("answer_type") is not None:
            by_type.setdefault(_answer_type_key(str(ann["answer_type"])), []).append(score)
    if not scores:
        return {}
    result: dict[str, float] = {"acc": 100.0 * sum(scores) / len(scores), "num_scored": len(scores)}
    for key in sorted(by_type):
        result[f"acc_{key}"] = 100.0 * sum(by_type[key]) / len(by_type[key])
        result[f"num_{key}"] = len(by_type[key])
    return result


# ----------------------------------------------------------------------------- retrieval

RECALL_AT = (1, 5, 10)


def _score_array(scores) -> np.ndarray:
    """A 2-D numpy array of `scores` in their own dtype (torch half / bfloat16 as float32, the
    dtype of ALBEF's score matrix), as `itm_eval` sorts them."""
    if hasattr(scores, "detach"):  # a torch tensor
        scores = scores.detach().cpu()
        if scores.dtype.is_floating_point and scores.element_size() < 4:
            scores = scores.float()
        scores = scores.numpy()
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"a score matrix must be 2-D, got shape {scores.shape}")
    return scores


def retrieval_ranks(scores, positives: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per query (row): the rank (0 = first) of its best-placed positive in `itm_eval`'s order,
    `np.argsort(row)[::-1]`, and whether a negative ties the best positive's score.

    Where no negative ties the best positive, the rank is the number of candidates scoring above
    it (the same in any sort order); rows with such a tie, or with a NaN, are ranked by
    `np.argsort` as `itm_eval` does, so their tie order is numpy's (it can vary with the numpy
    version and the CPU, for us as for `itm_eval`).
    """
    scores = _score_array(scores)
    num_rows, num_cols = scores.shape
    floating = np.issubdtype(scores.dtype, np.floating)
    if len(positives) < num_rows:
        raise ValueError(f"{num_rows} queries but positives for {len(positives)}")
    ranks = np.zeros(num_rows, dtype=np.int64)
    ties = np.zeros(num_rows, dtype=bool)
    for row in range(num_rows):
        score = scores[row]
        wanted = np.asarray(list(positives[row]), dtype=np.int64)
        if wanted.size == 0:
            raise ValueError(f"query {row} has no positive")
        best = score[wanted].max()
        negative = np.ones(num_cols, dtype=bool)
        negative[wanted] = False
        ties[row] = bool((score[negative] == best).any())
        if ties[row] or (floating and np.isnan(score).any()):
            order = np.argsort(score)[::-1]
            position = np.empty(num_cols, dtype=np.int64)
            position[order] = np.arange(num_cols)
            ranks[row] = position[wanted].min()
        else:
            ranks[row] = int((score > best).sum())
    return ranks, ties


def _recall(ranks: np.ndarray, k: int) -> float:
    return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)


def retrieval_recall(
    scores_i2t,
    scores_t2i,
    txt2img: Sequence[int] | Mapping[int, int],
    img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
) -> dict[str, float]:
    """ALBEF's `itm_eval`: Recall@{1,5,10} image->text (`txt_r*`, a hit when any caption of the
    image is within the top K) and text->image (`img_r*`), `txt_r_mean`, `img_r_mean`, `r_mean`,
    equal on any [images, texts] / [texts, images] score matrices (numpy, torch), ties included.

    Also `txt_ties` / `img_ties`: the number of image / text queries where a negative scores
    exactly as the best positive, i.e. whose rank depends on the tie order.
    """
    scores_i2t, scores_t2i = _score_array(scores_i2t), _score_array(scores_t2i)
    num_images, num_texts = scores_i2t.shape[0], scores_t2i.shape[0]
    txt_ranks, txt_ties = retrieval_ranks(scores_i2t, [img2txt[i] for i in range(num_images)])
    img_ranks, img_ties = retrieval_ranks(scores_t2i, [[txt2img[t]] for t in range(num_texts)])
    result = {f"txt_r{k}": _recall(txt_ranks, k) for k in RECALL_AT}
    result["txt_r_mean"] = sum(result[f"txt_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    result.update({f"img_r{k}": _recall(img_ranks, k) for k in RECALL_AT})
    result["img_r_mean"] = sum(result[f"img_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    result["txt_ties"] = int(txt_ties.sum())
    result["img_ties"] = int(img_ties.sum())
    return result


def chance_recall(img2txt: Sequence[Sequence[int]], num_texts: int) -> dict[str, float]:
    """Expected recall of a random ranking, keyed like `retrieval_recall`.

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


# ----------------------------------------------------------------------------- grounding

IOU_THRESHOLD = 0.5


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes with ALBEF's pixel convention (`computeIoU`).

    A box covers pixels x .. x + w - 1; the intersection counts only when it is more than one
    pixel wide and tall (ALBEF's strict `<`), the union is w1 h1 + w2 h2 - intersection.
    """
    x1, y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def score_boxes(heat, boxes: Sequence[Sequence[float]], alpha: float = 0.5):
    """ALBEF's box score ``heat[int(y):int(y+h), int(x):int(x+w)].sum() / (w h) ** alpha`` for each
    [x, y, w, h] box on the upsampled map `heat` [H, W] (a torch tensor or numpy array; the
    scores come back as the same kind). The slice is Python's, as in `grounding_eval`: a
    negative start or stop counts from the far edge, so a box reaching past the top or left
    edge sums an empty (or wrapped-around) region. Boxes without area score -inf."""
    scores = []
    for x, y, w, h in (b[:4] for b in boxes):
        area = w * h
        if area <= 0:
            scores.append(float("-inf"))
            continue
        scores.append(heat[int(y) : int(y + h), int(x) : int(x + w)].sum() / area**alpha)
    if hasattr(heat, "new_tensor"):  # torch
        import torch

        return torch.stack([heat.new_tensor(s) if isinstance(s, float) else s for s in scores]) if scores \
            else heat.new_zeros(0)
    return np.asarray(scores, dtype=np.float64)


def pick_box(heat, boxes: Sequence[Sequence[float]], alpha: float = 0.5) -> int:
    """Index of the best-scoring box (the first of equals)."""
    if not boxes:
        raise ValueError("no candidate boxes")
    return int(score_boxes(heat, boxes, alpha).argmax())


def grounding_accuracy(splits: Sequence[str], ious: Sequence[float], suffix: str = "_d") -> dict[str, float]:
    """Fraction of references whose picked box has IoU >= 0.5 with the true box, per split, in the
    order the splits first appear (keys ``{split}{suffix}``: `val_d`, `testA_d`, `testB_d` as
    ALBEF's `grounding_eval`)."""
    result = {}
    for split in dict.fromkeys(splits):
        hits = [iou >= IOU_THRESHOLD for s, iou in zip(splits, ious) if s == split]
        if hits:
            result[f"{split}{suffix}"] = sum(hits) / len(hits)
    return result


def chance_accuracy(splits: Sequence[str], hit_fractions: Sequence[float], suffix: str = "_d") -> dict[str, float]:
    """Expected accuracy of picking a candidate box uniformly at random, per split (keys
    ``{split}{suffix}_chance``); `hit_fractions` is, per reference, the fraction of its image's
    candidates with IoU >= 0.5."""
    result = {}
    for split in dict.fromkeys(splits):
        fractions = [f for s, f in zip(splits, hit_fractions) if s == split]
        if fractions:
            result[f"{split}{suffix}_chance"] = math.fsum(fractions) / len(fractions)
    return result


def topk_accuracy(ranking: np.ndarray | Sequence[Sequence[int]], labels: Sequence[int], k: int) -> float:
    """Percentage of rows whose label is among the first `k` classes of its ranking.

    `ranking` [N, C]: class indices, best first (e.g. `np.argsort(-scores, axis=1)`)."""
    ranking, labels = np.asarray(ranking), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    hits = (ranking[:, :k] == labels[:, None]).any(axis=1)
    return 100.0 * float(hits.mean())


def confusion_matrix(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def per_class_accuracy(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> np.ndarray:
    """[num_classes] percentage of each class's samples predicted as that class (NaN: no samples)."""
    matrix = confusion_matrix(predictions, labels, num_classes)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * np.diag(matrix) / np.maximum(totals, 1), np.nan)
