"""Classification and representation metrics: per-class scores, confusion, ROC, 2-D maps."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve


def per_class_report(y_true, y_pred, class_names) -> list[dict]:
    """One dict per class: {"class", "precision", "recall", "f1", "support"}; y_true, y_pred (M,) ints."""
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return [
        {"class": str(name), "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(class_names)
    ]


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes))).astype(np.int64)


def roc_auc_ovr(y_true, probabilities) -> dict:
    """One-vs-rest ROC from (M,) labels and (M, C) probabilities.

    Returns {"per_class": {c: auc}, "macro": mean over classes with both positives and negatives,
    "curves": {c: (fpr, tpr)}, "skipped": [classes without positives or negatives]}.
    """
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities)
    per_class, curves, skipped = {}, {}, []
    for c in range(probabilities.shape[1]):
        positive = y_true == c
        if positive.all() or not positive.any():
            skipped.append(c)
            continue
        per_class[c] = float(roc_auc_score(positive, probabilities[:, c]))
        fpr, tpr, _ = roc_curve(positive, probabilities[:, c])
        curves[c] = (fpr, tpr)
    macro = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"per_class": per_class, "macro": macro, "curves": curves, "skipped": skipped}


def project_2d(features, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) features -> (N, 2) coordinates by "pca" or "tsne" (sklearn)."""
    x = np.asarray(features, dtype=np.float32)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        return TSNE(
            n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed
        ).fit_transform(x)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
