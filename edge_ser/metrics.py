"""The metrics SER reports: UAR (primary), WA, macro-F1 and the confusion matrix.

>>> scores([0, 1, 1, 2], [0, 1, 2, 2], num_classes=3)["uar"]
0.8333333333333334
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def uar_from_confusion(cm: np.ndarray) -> float:
    """Unweighted average recall over the classes present in the reference."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def scores(y_true, y_pred, num_classes: int, class_names: Sequence[str] | None = None) -> Dict:
    """UAR, WA (accuracy), macro-F1 and the confusion matrix (as nested lists) in one dict."""
    cm = confusion(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    total = int(cm.sum())
    out = {
        "uar": uar_from_confusion(cm),
        "wa": float(tp.sum() / total) if total else float("nan"),
        "f1": float(f1[present].mean()) if present.any() else float("nan"),
        "n": total,
        "confusion": cm.tolist(),
        "recall": {(class_names[i] if class_names else str(i)): float(recall[i]) for i in range(num_classes) if present[i]},
    }
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
