"""Classification metrics from a confusion matrix: accuracy, per-class precision, recall,
F1 and support, macro F1. Pure functions (lists and arrays in, a JSON-ready dict out);
the run's centralised evaluation and ``fedlora evaluate`` both report through them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "confusion_metrics"]


def confusion_metrics(confusion: Sequence[Sequence[int]] | np.ndarray,
                      label_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and macro F1 of ``confusion``
    (k x k, ``confusion[i][j]``: examples of true label i predicted as j). An undefined
    ratio (no prediction or no example of a class) is 0, as scikit-learn's
    ``zero_division=0``."""
    k = len(label_names)
    confusion = np.asarray(confusion, dtype=np.int64).reshape(k, k)  # (true, predicted)
    n = int(confusion.sum())
    per_class = {}
    for i, name in enumerate(label_names):
        tp = int(confusion[i, i])
        predicted, support = int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": support}
    return {"examples": n, "accuracy": float(np.trace(confusion) / n) if n else float("nan"),
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])) if k else 0.0,
            "per_class": per_class, "labels": list(label_names),
            "confusion_matrix": confusion.tolist()}


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           label_names: Sequence[str]) -> dict[str, Any]:
    """:func:`confusion_metrics` of true labels ``y_true`` and predictions ``y_pred``
    (indices into ``label_names``)."""
    k = len(label_names)
    confusion = np.zeros((k, k), dtype=np.int64)  # (true, predicted)
    np.add.at(confusion, (np.asarray(y_true, dtype=np.int64),
                          np.asarray(y_pred, dtype=np.int64)), 1)
    return confusion_metrics(confusion, label_names)
