"""Retrieval of same-class bank items by cosine similarity: recall@k, precision@k, mAP@R, mAP.

Every query ranks the whole bank (ties: lower bank index first); a bank item is relevant when it
has the query's label. R is the number of relevant bank items for the query. A query whose class is
absent from the bank scores 0 on every metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from selfsup.eval.knn import check_split_pair, inverse_norms  # noqa: E402

_RANK_ELEMENTS = 2**24  # (query, bank) pairs ranked at once


def retrieval_metrics(bank, bank_labels, queries, query_labels, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean over queries (M, D) of ranking the bank (N, D): "recall@k" (any relevant item in the top
    k), "precision@k" (share of the top k that is relevant), "map@r" (mAP@R) and "map" (full ranking).

    Holds a float32 copy of the bank; queries are ranked in chunks of ``_RANK_ELEMENTS`` pairs."""
    bank, bank_labels, queries, query_labels = check_split_pair(bank, bank_labels, queries, query_labels)
    if not ks or min(ks) < 1 or max(ks) > len(bank):
        raise ValueError(f"ks must lie in [1, {len(bank)}] (the bank size), got {tuple(ks)}")
    b = torch.from_numpy(bank.astype(np.float32) * inverse_norms(bank)[:, None])
    q = torch.from_numpy(queries.astype(np.float32) * inverse_norms(queries)[:, None])
    n_relevant = np.bincount(bank_labels, minlength=query_labels.max() + 1)[query_labels]  # (M,) R
    labels = torch.from_numpy(bank_labels)
    ranks = torch.arange(1, len(bank) + 1, dtype=torch.float64)
    sums = {f"recall@{k}": 0.0 for k in ks} | {f"precision@{k}": 0.0 for k in ks} | {"map@r": 0.0, "map": 0.0}
    step = max(1, _RANK_ELEMENTS // len(bank))
    for s in range(0, len(q), step):
        order = torch.sort(q[s : s + step] @ b.T, dim=1, descending=True, stable=True).indices
        rel = labels[order] == torch.from_numpy(query_labels[s : s + step]).unsqueeze(1)  # (m, N)
        r = torch.from_numpy(n_relevant[s : s + step]).double()
        precision_at = rel.cumsum(1) / ranks  # (m, N): precision at each rank
        gain = precision_at * rel
        for k in ks:
            sums[f"recall@{k}"] += rel[:, :k].any(1).sum().item()
            sums[f"precision@{k}"] += rel[:, :k].double().mean(1).sum().item()
        safe_r = r.clamp(min=1)
        sums["map@r"] += ((gain * (ranks <= r.unsqueeze(1))).sum(1) / safe_r).sum().item()
        sums["map"] += (gain.sum(1) / safe_r).sum().item()
    return {key: value / len(q) for key, value in sums.items()}


def save_neighbour_grid(
    path, query_images, neighbour_images, query_labels, neighbour_labels, class_names=None, title: str = ""
) -> Path:
    """PNG grid under ``title``: one row per query, its image then its neighbours, titled by class; a
    neighbour of the query's class is framed green, any other red.

    query_images (Q, H, W[, C]) or (Q, C, H, W); neighbour_images (Q, K, ...) likewise;
    query_labels (Q,); neighbour_labels (Q, K).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    q_img, n_img = np.asarray(query_images), np.asarray(neighbour_images)
    q_lab, n_lab = np.asarray(query_labels), np.asarray(neighbour_labels)
    rows, k = n_lab.shape
    if len(q_img) != rows or n_img.shape[:2] != (rows, k) or len(q_lab) != rows:
        raise ValueError(f"{len(q_img)} queries, {n_img.shape[:2]} neighbour images, {n_lab.shape} neighbour labels")

    def name(label) -> str:
        return str(class_names[int(label)]) if class_names is not None else str(int(label))

    fig, axes = plt.subplots(rows, k + 1, figsize=(1.4 * (k + 1), 1.5 * rows), squeeze=False)
    for i in range(rows):
        cells = [(q_img[i], f"query: {name(q_lab[i])}", "black")]
        cells += [(n_img[i, j], name(n_lab[i, j]), "green" if n_lab[i, j] == q_lab[i] else "red") for j in range(k)]
        for ax, (img, title, colour) in zip(axes[i], cells):
            ax.imshow(_displayable(img), cmap="gray")
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _displayable(img: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) with C in {1, 3} -> (H, W) or (H, W, 3) scaled to [0, 1]."""
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    img = img.astype(np.float32)
    low, high = img.min(), img.max()
    return (img - low) / (high - low) if high > low else np.zeros_like(img)
