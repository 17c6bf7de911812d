"""Retrieval metrics against a hand-computed ranking, sklearn and kNN; the neighbour grid PNG."""

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn.metrics import average_precision_score

from selfsup.eval import retrieval
from selfsup.eval.knn import weighted_knn
from selfsup.eval.retrieval import retrieval_metrics, save_neighbour_grid


def unit(degrees):
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


def test_hand_computed_ranking_with_a_tie_and_an_unseen_class():
    # bank index:     0   1   2   3   4   5    6 (= row 2, exact tie)
    bank = unit([10, 20, 30, 40, 50, 170, 30])
    bank_labels = np.array([0, 1, 0, 1, 0, 1, 1])
    # query 0 at 0 deg (class 0): ranking 0 1 2 6 3 4 5 -> relevant 1 0 1 0 0 1 0, R = 3
    # query 1 at 36 deg (class 1): ranking 3 2 6 4 1 0 5 -> relevant 1 0 1 0 1 0 1, R = 4
    # query 2 (class 2) has no relevant item in the bank: 0 everywhere
    queries = unit([0, 36, 90])
    m = retrieval_metrics(bank, bank_labels, queries, np.array([0, 1, 2]), ks=(1, 2, 5))
    expected = {
        "recall@1": 2 / 3,
        "recall@2": 2 / 3,
        "recall@5": 2 / 3,
        "precision@1": 2 / 3,
        "precision@2": (1 / 2 + 1 / 2) / 3,
        "precision@5": (2 / 5 + 3 / 5) / 3,
        "map@r": ((1 + 2 / 3) / 3 + (1 + 2 / 3) / 4) / 3,
        "map": ((1 + 2 / 3 + 3 / 6) / 3 + (1 + 2 / 3 + 3 / 5 + 4 / 7) / 4) / 3,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_agrees_with_sklearn_average_precision_and_knn_in_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 12))
    yb, yq = rng.integers(0, 5, 300), rng.integers(0, 5, 40)
    bank = (centres[yb] + 1.5 * rng.normal(size=(300, 12))).astype(np.float32)
    queries = (centres[yq] + 1.5 * rng.normal(size=(40, 12))).astype(np.float32)
    monkeypatch.setattr(retrieval, "_RANK_ELEMENTS", 300 * 7)  # 7 queries per chunk
    m = retrieval_metrics(bank, yb, queries, yq, ks=(1, 10))
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ b.T
    ap = np.mean([average_precision_score(yb == yq[i], sims[i]) for i in range(40)])
    assert m["map"] == pytest.approx(ap, abs=1e-9)
    nb = weighted_knn(bank, yb, queries, yq, ((10, 0.07),), backend="numpy").neighbours
    assert m["recall@1"] == pytest.approx((yb[nb[:, 0]] == yq).mean(), abs=1e-12)
    assert m["precision@10"] == pytest.approx((yb[nb] == yq[:, None]).mean(), abs=1e-12)
    assert m["recall@10"] == pytest.approx((yb[nb] == yq[:, None]).any(1).mean(), abs=1e-12)
    assert 0 < m["map@r"] <= m["recall@10"] <= 1


def test_retrieval_validation():
    bank = unit([0, 90])
    with pytest.raises(ValueError, match="ks must lie in"):
        retrieval_metrics(bank, np.array([0, 1]), bank, np.array([0, 1]), ks=(1, 5))
    with pytest.raises(ValueError, match="the test split is empty"):
        retrieval_metrics(bank, np.array([0, 1]), bank[:0], np.array([], np.int64), ks=(1,))


def test_neighbour_grid_png(tmp_path):
    rng = np.random.default_rng(1)
    queries = rng.random((3, 1, 8, 8))  # channels-first greyscale
    neighbours = rng.integers(0, 255, (3, 4, 8, 8, 3), dtype=np.uint8)  # channels-last RGB
    path = save_neighbour_grid(
        tmp_path / "grids" / "nn.png", queries, neighbours, [0, 1, 2], [[0, 1, 0, 2]] * 3, ["zero", "one", "two"]
    )
    image = imread(path)
    assert path.exists() and image.shape[0] > 100 and image.shape[1] > 300
    with pytest.raises(ValueError, match="neighbour labels"):
        save_neighbour_grid(tmp_path / "bad.png", queries, neighbours, [0, 1, 2], [[0, 1]] * 3)
