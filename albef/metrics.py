"""Evaluation metrics as plain functions of arrays (no model, no data loader).

Classification (zero-shot, albef/tasks/zeroshot.py): `topk_accuracy`, `per_class_accuracy`,
`confusion_matrix`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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
