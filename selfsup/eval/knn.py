"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Features are L2-normalised; each query is searched ONCE at the largest k, then for every (k, T)
setting its first k neighbours vote with weights ``exp(similarity / T)``; a class's score is the
sum of its neighbours' weights. Top-1 / top-5 are read off the class scores.

Three exact search engines give the same neighbours bit for bit: ``faiss`` (``faiss.knn``, the
brute-force inner-product search behind ``IndexFlatIP``; on GPU where faiss has GPU support),
``torch`` (``mm`` + ``topk``, on CUDA when available) and ``numpy`` (the reference). Each engine
only proposes a few extra candidates per query; the candidates are then re-scored by one shared,
engine-independent routine and ordered by (-similarity, bank index). A query whose k-th re-scored
similarity is not clearly above the engine's candidate cut-off (ties or near-ties there) is
searched again with more candidates, so the result is the exact top-k under that order.

The bank is read in blocks of ``_BLOCK_BYTES`` of float32, converting (e.g. from fp16) and
normalising block by block, so a bank is never copied whole.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)
notes = logging.getLogger("selfsup.note")  # the console says these as `selfsup: note: ...`

_BLOCK_BYTES = 2**27  # float32 bytes of one normalised bank block
_TILE_ELEMENTS = 2**25  # similarities held at once by the torch / numpy engines on CPU
_RESCORE_ELEMENTS = 2**20  # gathered feature values held at once while re-scoring
_TOL = 1e-5  # bound on |engine float32 similarity - re-scored similarity| for unit vectors
BACKENDS = ("faiss", "torch", "numpy")


@dataclass
class KNNResult:
    """Weighted kNN scores, one key ``"knn@{k}"`` per (k, T) setting.

    ``top1`` / ``top5``: fraction of queries correct. ``predictions``: (M,) int64 labels.
    ``neighbours``: (M, k_max) int64 bank indices, best first; ``similarities``: (M, k_max) float32.
    ``unseen_classes``: labels present in the queries but not the bank (always errors).
    """

    top1: dict[str, float]
    top5: dict[str, float]
    predictions: dict[str, np.ndarray]
    neighbours: np.ndarray
    similarities: np.ndarray
    unseen_classes: list[int] = field(default_factory=list)


def weighted_knn(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    settings: Sequence[tuple[int, float]] = ((20, 0.07), (200, 0.1)),
    num_classes: int | None = None,
    backend: str = "auto",
    chunk_size: int = 8192,
) -> KNNResult:
    """Classify ``queries`` (M, D) by weighted vote of their nearest rows of ``bank`` (N, D).

    ``bank_labels`` (N,) / ``query_labels`` (M,) are integer classes. ``settings``: (k, T) pairs with
    distinct k; a k above N is lowered to N, said in a note. ``backend``: "faiss", "torch", "numpy"
    or "auto" (faiss if importable, else torch): every engine gives the exact neighbours. ``chunk_size``:
    queries per search call.
    """
    bank, bank_labels, queries, query_labels = check_split_pair(bank, bank_labels, queries, query_labels)
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    elif max(bank_labels.max(), query_labels.max()) >= num_classes:
        raise ValueError(f"labels go up to {max(bank_labels.max(), query_labels.max())} but num_classes={num_classes}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    backend = _resolve_backend(backend)
    checked = _check_settings(settings, len(bank))

    k_max = max(k for _, k, _ in checked)
    inv_bank = inverse_norms(bank)
    q = queries.astype(np.float32) * inverse_norms(queries)[:, None]
    nb, sims = _exact_neighbours(bank, inv_bank, q, k_max, backend, chunk_size)

    nb_labels = bank_labels[nb]
    top1, top5, predictions = {}, {}, {}
    for key, k, t in checked:
        pred, ok1, ok5 = _vote(nb_labels[:, :k], sims[:, :k], t, num_classes, query_labels, chunk_size)
        top1[key], top5[key], predictions[key] = float(ok1.mean()), float(ok5.mean()), pred
    unseen = sorted(set(np.unique(query_labels).tolist()) - set(np.unique(bank_labels).tolist()))
    return KNNResult(top1, top5, predictions, nb, sims, unseen)


FAISS_WHEELS = ("faiss-cpu", "faiss-gpu-cu12")  # the extras `cpu` and `gpu`: one `faiss` module, two wheels


@functools.cache
def _faiss():
    """faiss, imported on first use, so that its loader's lines follow the logging the caller set up
    (a Ray worker quietens it only once it runs); None when it is not installed (an extra: torch and
    numpy give the same neighbours without it). Warns once when both FAISS wheels are installed."""
    both = installed(FAISS_WHEELS)
    if len(both) > 1:
        log.warning(
            "%s are both installed and write the same `faiss` module (the one installed last won): "
            "pip uninstall -y %s, then reinstall selfsup with one extra, '.[cpu]' or '.[gpu]'",
            " and ".join(both),
            " ".join(both),
        )
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def installed(distributions: Sequence[str]) -> list[str]:
    """Those of ``distributions`` that are installed."""
    found = []
    for name in distributions:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "faiss" if _faiss() is not None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and _faiss() is None:
        raise ValueError(
            "backend='faiss' but faiss is not installed: install selfsup with the extra '.[cpu]' "
            "(faiss-cpu) or '.[gpu]' (faiss-gpu-cu12)"
        )
    return backend


def check_features(x, name: str, split: str) -> np.ndarray:
    """(rows, D) float array, finite; NaN/inf rows are counted in the error."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dim) array, got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"the {split} split is empty: {name} has no rows")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero feature dimensions")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    step = max(1, _BLOCK_BYTES // (4 * x.shape[1]))
    bad = sum(int((~np.isfinite(x[s : s + step]).all(axis=1)).sum()) for s in range(0, len(x), step))
    if bad:
        raise ValueError(f"{bad} rows of the {name} contain NaN or inf")
    return x


def check_labels(y, n: int, name: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} labels must have shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} labels must be integers, got {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"{name} labels must be non-negative, got {y.min()}")
    return y.astype(np.int64)


def check_split_pair(train_x, train_y, test_x, test_y, names: tuple[str, str] = ("bank", "queries")):
    """Validated (train (N, D), train labels (N,), test (M, D), test labels (M,)): finite features of
    one dimension and one label per row; errors name the split."""
    train_x = check_features(train_x, names[0], "train")
    test_x = check_features(test_x, names[1], "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"{names[0]} has dimension {train_x.shape[1]} but {names[1]} have {test_x.shape[1]}")
    return train_x, check_labels(train_y, len(train_x), names[0]), test_x, check_labels(test_y, len(test_x), names[1])


@functools.cache
def _note_once(line: str) -> None:
    """Say ``line`` as a note the first time only: every encoder of an evaluation is scored on the same
    bank."""
    notes.info(line)


def _check_settings(settings: Sequence[tuple[int, float]], n: int) -> list[tuple[str, int, float]]:
    """(key, k actually used, T) per setting; k is lowered to the bank size ``n``, said in a note."""
    out = []
    for k, t in settings:
        k, t = int(k), float(t)
        if k < 1 or t <= 0:
            raise ValueError(f"each setting needs k >= 1 and T > 0, got ({k}, {t})")
        if k > n:
            _note_once(f"kNN: k={k} is larger than the bank ({n} rows); using k={n} under the key 'knn@{k}'")
        out.append((f"knn@{k}", min(k, n), t))
    keys = [key for key, _, _ in out]
    if not out or len(set(keys)) != len(keys):
        raise ValueError(f"settings need at least one entry and distinct k values, got {list(settings)}")
    return out


def inverse_norms(x: np.ndarray) -> np.ndarray:
    """(rows,) float32 1 / max(||row||, 1e-12), computed block by block."""
    step = max(1, _BLOCK_BYTES // (4 * x.shape[1]))
    norms = np.concatenate([np.linalg.norm(x[s : s + step].astype(np.float32), axis=1) for s in range(0, len(x), step)])
    return (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)


def _bank_block(bank: np.ndarray, inv: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(stop - start, D) float32 unit rows of ``bank``, converted from its own dtype."""
    block = bank[start:stop].astype(np.float32)
    block *= inv[start:stop, None]
    return block


def _faiss_gpu() -> bool:
    faiss = _faiss()
    return faiss is not None and hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0


@functools.cache
def _gpu_resources():
    """One faiss GPU resource object (scratch memory, streams) per process."""
    return _faiss().StandardGpuResources()


@contextlib.contextmanager
def _full_fp32_matmul():
    """Exact fp32 matmuls even where training code allowed TF32 / bf16 (the _TOL bound needs them)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _block_topk(q: np.ndarray, block: np.ndarray, k: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of ``q`` (m, D) against ``block`` (n, D), in any order: (m, k) f32, (m, k) i64."""
    if backend == "faiss":
        faiss = _faiss()
        faiss.omp_set_num_threads(torch.get_num_threads())  # the count evaluation chose, not every core
        if _faiss_gpu():
            return faiss.knn_gpu(_gpu_resources(), q, block, k, metric=faiss.METRIC_INNER_PRODUCT)
        return faiss.knn(q, block, k, metric=faiss.METRIC_INNER_PRODUCT)
    if backend == "torch":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        b = torch.from_numpy(block).to(device)
        step = max(1, (_TILE_ELEMENTS * (8 if device == "cuda" else 1)) // len(block))
        sims, idx = [], []
        with _full_fp32_matmul():
            for s in range(0, len(q), step):
                v, i = torch.topk(torch.from_numpy(q[s : s + step]).to(device) @ b.T, k, dim=1, sorted=False)
                sims.append(v.cpu().numpy())
                idx.append(i.cpu().numpy())
        return np.concatenate(sims), np.concatenate(idx)
    step = max(1, _TILE_ELEMENTS // len(block))
    np_sims: list[np.ndarray] = []
    np_idx: list[np.ndarray] = []
    for s in range(0, len(q), step):
        full = q[s : s + step] @ block.T
        top = (
            np.argpartition(-full, k - 1, axis=1)[:, :k]
            if k < len(block)
            else np.broadcast_to(np.arange(k), full.shape)
        )
        np_sims.append(np.take_along_axis(full, top, axis=1))
        np_idx.append(top)
    return np.concatenate(np_sims), np.concatenate(np_idx).astype(np.int64)


def _candidates(bank, inv, q, kc: int, backend: str, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Engine top-``kc`` over the whole bank, block by block: (M, kc) f32 similarities, (M, kc) i64 indices."""
    n, d = bank.shape
    rows = max(kc, _BLOCK_BYTES // (4 * d))
    best_s = np.full((len(q), kc), -np.inf, np.float32)
    best_i = np.full((len(q), kc), -1, np.int64)
    for start in range(0, n, rows):
        block = _bank_block(bank, inv, start, min(n, start + rows))
        kb = min(kc, len(block))
        for s in range(0, len(q), chunk_size):
            v, i = _block_topk(np.ascontiguousarray(q[s : s + chunk_size]), block, kb, backend)
            if start == 0:  # the first block holds at least kc rows
                best_s[s : s + chunk_size], best_i[s : s + chunk_size] = v, i
                continue
            v = np.concatenate([best_s[s : s + chunk_size], v], axis=1)
            i = np.concatenate([best_i[s : s + chunk_size], i + start], axis=1)
            keep = np.argpartition(-v, kc - 1, axis=1)[:, :kc]
            best_s[s : s + chunk_size] = np.take_along_axis(v, keep, axis=1)
            best_i[s : s + chunk_size] = np.take_along_axis(i, keep, axis=1)
    return best_s, best_i


def _rescore(bank: np.ndarray, inv: np.ndarray, q: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(m, kc) float32 cosine similarities of ``q`` (m, D) with bank rows ``idx`` (m, kc).

    Each value depends only on its (query, bank row) pair, never on the engine or on its
    neighbours in the batch (numpy's einsum reduces each pair on its own, single-threaded, which
    also keeps it fast on a busy machine), so equal rows give bit-identical similarities.
    """
    m, kc = idx.shape
    out = np.empty((m, kc), np.float32)
    step = max(1, _RESCORE_ELEMENTS // (kc * bank.shape[1]))  # small gathers stay in cache
    for s in range(0, m, step):
        rows = bank[idx[s : s + step]].astype(np.float32, copy=False)  # (step, kc, D)
        out[s : s + step] = np.einsum("mkd,md->mk", rows, q[s : s + step])
    return out * inv[idx]


def _order(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First ``k`` candidates per row under the order (-similarity, bank index)."""
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(sims, order, axis=1)


def _exact_neighbours(bank, inv, q, k: int, backend: str, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` under (-similarity, index): (M, k) i64 bank indices, (M, k) f32 similarities."""
    n = len(bank)
    nb = np.empty((len(q), k), np.int64)
    sims = np.empty((len(q), k), np.float32)
    todo = np.arange(len(q))
    kc = min(n, k + max(16, k // 8))
    while len(todo):
        approx, idx = _candidates(bank, inv, q[todo], kc, backend, chunk_size)
        nb[todo], sims[todo] = _order(_rescore(bank, inv, q[todo], idx), idx, k)
        if kc == n:
            break
        # A row outside the candidates scores at most cut-off + _TOL; the k-th must beat that.
        todo = todo[~(sims[todo, k - 1] > approx.min(axis=1) + _TOL)]
        kc = min(n, 2 * kc)
    return nb, sims


def _vote(nb_labels, sims, t: float, c: int, y: np.ndarray, chunk_size: int):
    """Weighted vote. nb_labels (M, k), sims (M, k), y (M,) -> predictions (M,), top-1 / top-5 hits (M,) bool.

    A class with no neighbour has score 0 and never counts as predicted, even inside the top 5.
    """
    preds, ok1, ok5 = [], [], []
    for s in range(0, len(y), chunk_size):
        lab, w = nb_labels[s : s + chunk_size], np.exp(sims[s : s + chunk_size].astype(np.float64) / t)
        m = len(lab)
        flat = (np.arange(m)[:, None] * c + lab).ravel()
        scores = np.bincount(flat, weights=w.ravel(), minlength=m * c).reshape(m, c)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : min(5, c)]
        hit = (top == y[s : s + chunk_size, None]) & (np.take_along_axis(scores, top, axis=1) > 0)
        preds.append(top[:, 0])
        ok1.append(hit[:, 0])
        ok5.append(hit.any(axis=1))
    return np.concatenate(preds).astype(np.int64), np.concatenate(ok1), np.concatenate(ok5)
