"""Weighted kNN: engine agreement, tie-breaking, hand-computed votes, validation."""

import importlib.metadata
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.eval import knn
from selfsup.eval.knn import weighted_knn

BACKENDS = ("faiss", "torch", "numpy")


def clustered(rng, n, classes=6, dim=16, noise=1.2, centres=None):
    centres = rng.normal(size=(classes, dim)) if centres is None else centres
    y = rng.integers(0, classes, n)
    return (centres[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y, centres


def reference_knn(bank, yb, queries, yq, k, t, c):
    """Dense float64 DINO vote: neighbours ordered by (-cosine, index); zero-score classes never hit."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ b.T.astype(np.float64)
    nb = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    w = np.exp(np.take_along_axis(sims, nb, axis=1) / t)
    scores = np.zeros((len(q), c))
    for i in range(len(q)):
        np.add.at(scores[i], yb[nb[i]], w[i])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    hit = (top == yq[:, None]) & (np.take_along_axis(scores, top, axis=1) > 0)
    return nb, hit[:, 0].mean(), hit.any(axis=1).mean()


@pytest.fixture
def data_with_ties():
    rng = np.random.default_rng(0)
    bank, yb, centres = clustered(rng, 400)
    bank[200:320] = bank[:120]  # duplicated rows: exact ties in every ranking
    yb[200:320] = yb[:120]
    queries, yq, _ = clustered(rng, 150, centres=centres)
    queries[:10] = 2.5 * bank[:10]  # queries that tie with two bank rows at similarity 1
    return bank, yb, queries, yq


def test_backends_agree_exactly_and_match_dense_reference(data_with_ties):
    bank, yb, queries, yq = data_with_ties
    settings = ((5, 0.07), (40, 0.1))
    results = {b: weighted_knn(bank, yb, queries, yq, settings, backend=b, chunk_size=64) for b in BACKENDS}
    ref = results["numpy"]
    for r in results.values():
        np.testing.assert_array_equal(r.neighbours, ref.neighbours)
        np.testing.assert_array_equal(r.similarities, ref.similarities)
        for key in ("knn@5", "knn@40"):
            assert abs(r.top1[key] - ref.top1[key]) < 1e-9 and abs(r.top5[key] - ref.top5[key]) < 1e-9
            np.testing.assert_array_equal(r.predictions[key], ref.predictions[key])
    # The tie rule is (-similarity, index): duplicate rows come out lower index first.
    assert (ref.neighbours[:10, :2] == np.stack([np.arange(10), np.arange(200, 210)], 1)).all()
    for k, t in settings:
        nb, top1, top5 = reference_knn(bank, yb, queries, yq, k, t, 6)
        np.testing.assert_array_equal(ref.neighbours[:, :k], nb)
        assert ref.top1[f"knn@{k}"] == pytest.approx(top1, abs=1e-12)
        assert ref.top5[f"knn@{k}"] == pytest.approx(top5, abs=1e-12)
    assert 0.6 < ref.top1["knn@40"] <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_straddling_the_candidate_cutoff_are_resolved_by_index(backend):
    # 60 identical rows: every engine proposes an arbitrary 21 of them; the result must be the lowest 5.
    rng = np.random.default_rng(1)
    bank = np.concatenate([np.tile([[1.0, 0.0, 0.0]], (60, 1)), rng.normal(size=(40, 3)) * [0.1, 1, 1]]).astype(
        np.float32
    )
    labels = np.arange(100) % 3
    r = weighted_knn(bank, labels, np.array([[3.0, 0, 0]], np.float32), np.array([0]), ((5, 0.1),), backend=backend)
    assert r.neighbours[0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(r.similarities[0], 1.0, atol=1e-6)


def test_hand_computed_weighted_vote():
    # Query along x; bank at angles 0, 60, 90, 180 degrees: cosines 1, 0.5, 0, -1.
    bank = np.array([[1, 0], [0.5, math.sqrt(3) / 2], [0, 2], [-1, 0]], np.float32)
    yb = np.array([0, 1, 1, 2])
    q = np.array([[2.0, 0.0]], np.float32)
    r = weighted_knn(bank, yb, q, np.array([1]), ((1, 1.0), (3, 1.0), (4, 0.5)), backend="numpy")
    assert r.neighbours[0].tolist() == [0, 1, 2, 3]
    # k=1: class 0 only -> wrong. k=3, T=1: class 0 e^1 = 2.718 > class 1 e^0.5 + e^0 = 2.649 -> wrong.
    assert r.top1["knn@1"] == 0.0 and r.top1["knn@3"] == 0.0
    # k=4, T=0.5: class 0 e^2 = 7.389 > class 1 e^1 + e^0 = 3.718 -> still wrong, but in the top 5.
    assert r.predictions["knn@4"].tolist() == [0] and r.top5["knn@4"] == 1.0
    r = weighted_knn(bank, yb, q, np.array([1]), ((3, 2.0),), backend="faiss")
    # T=2: class 0 e^0.5 = 1.649 < class 1 e^0.25 + e^0 = 2.284 -> correct.
    assert r.top1["knn@3"] == 1.0 and r.predictions["knn@3"].tolist() == [1]


def test_unseen_query_class_is_an_error_even_in_top5():
    rng = np.random.default_rng(2)
    bank, yb, _ = clustered(rng, 60, classes=3)
    queries = rng.normal(size=(4, 16)).astype(np.float32)
    yq = np.array([0, 7, 7, 1])  # class 7 never appears in the bank
    r = weighted_knn(bank, yb, queries, yq, ((10, 0.1),), num_classes=8)
    assert r.unseen_classes == [7]
    ok5 = r.top5["knn@10"] * 4
    assert ok5 <= 2 + 1e-9  # classes 3..7 have no votes, so the unseen queries can never hit
    assert set(r.predictions["knn@10"].tolist()) <= {0, 1, 2}


def test_chunking_and_bank_blocks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(3)
    bank, yb, centres = clustered(rng, 700, dim=8)
    queries, yq, _ = clustered(rng, 33, dim=8, centres=centres)
    whole = weighted_knn(bank, yb, queries, yq, ((10, 0.07),), backend="faiss", chunk_size=8192)
    monkeypatch.setattr(knn, "_BLOCK_BYTES", 4 * 8 * 100)  # 100-row bank blocks, merged
    for backend in BACKENDS:
        r = weighted_knn(bank.astype(np.float16), yb, queries, yq, ((10, 0.07),), backend=backend, chunk_size=5)
        ref = weighted_knn(bank.astype(np.float16), yb, queries, yq, ((10, 0.07),), backend="numpy")
        np.testing.assert_array_equal(r.neighbours, ref.neighbours)
        assert abs(r.top1["knn@10"] - whole.top1["knn@10"]) <= 2 / 33  # fp16 rounding may move a vote


def test_k_above_bank_size_is_lowered_with_a_note(capsys):
    import warnings

    from selfsup import cli

    rng = np.random.default_rng(4)
    bank, yb, _ = clustered(rng, 12)
    cli.setup_logging(verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw UserWarning would fail here
        r = weighted_knn(bank, yb, bank[:3], yb[:3], ((50, 0.1),))
    assert r.neighbours.shape == (3, 12) and "knn@50" in r.top1
    assert capsys.readouterr().err.splitlines() == [
        "selfsup: note: kNN: k=50 is larger than the bank (12 rows); using k=12 under the key 'knn@50'"
    ]


def test_validation_errors():
    rng = np.random.default_rng(6)
    bank, yb, _ = clustered(rng, 20)
    bad = bank.copy()
    bad[[1, 5, 7], 0] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match="3 rows of the bank contain NaN or inf"):
        weighted_knn(bad, yb, bank, yb)
    with pytest.raises(ValueError, match="1 rows of the queries contain NaN or inf"):
        weighted_knn(bank, yb, bad[:2], yb[:2])
    with pytest.raises(ValueError, match="the train split is empty"):
        weighted_knn(bank[:0], yb[:0], bank, yb)
    with pytest.raises(ValueError, match="the test split is empty"):
        weighted_knn(bank, yb, bank[:0], yb[:0])
    with pytest.raises(ValueError, match="dimension 16 but queries have 8"):
        weighted_knn(bank, yb, bank[:, :8], yb)
    with pytest.raises(ValueError, match=r"bank labels must have shape \(20,\)"):
        weighted_knn(bank, yb[:-1], bank, yb)
    with pytest.raises(ValueError, match="num_classes=3"):
        weighted_knn(bank, yb, bank, yb, num_classes=3)
    with pytest.raises(ValueError, match="backend"):
        weighted_knn(bank, yb, bank, yb, backend="annoy")
    with pytest.raises(ValueError, match="distinct k"):
        weighted_knn(bank, yb, bank, yb, settings=((5, 0.1), (5, 0.07)))


def test_torch_engine_ignores_reduced_matmul_precision():
    rng = np.random.default_rng(7)
    bank, yb, centres = clustered(rng, 300)
    queries, yq, _ = clustered(rng, 20, centres=centres)
    ref = weighted_knn(bank, yb, queries, yq, ((10, 0.1),), backend="numpy")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        r = weighted_knn(bank, yb, queries, yq, ((10, 0.1),), backend="torch")
        assert torch.get_float32_matmul_precision() == "medium"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision(previous)
    np.testing.assert_array_equal(r.neighbours, ref.neighbours)


def test_the_two_faiss_wheels_are_alternative_extras_never_both_by_default():
    """faiss-cpu and faiss-gpu-cu12 write the same `faiss` module: a default dependency beside a `gpu`
    extra would leave install order to decide which one works."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    wheel = lambda spec: spec.split(">")[0].split("=")[0].split("<")[0]  # noqa: E731
    assert not {wheel(d) for d in project["dependencies"]} & set(knn.FAISS_WHEELS)
    extras = project["optional-dependencies"]
    assert [wheel(d) for d in extras["cpu"]] == ["faiss-cpu"] and [wheel(d) for d in extras["gpu"]] == [
        "faiss-gpu-cu12"
    ]
    assert not any(set(map(wheel, deps)) >= set(knn.FAISS_WHEELS) for deps in extras.values())


def test_both_faiss_wheels_installed_is_said_in_one_line(monkeypatch, caplog):
    real = importlib.metadata.distribution
    monkeypatch.setattr(
        importlib.metadata, "distribution", lambda name: object() if name in knn.FAISS_WHEELS else real(name)
    )
    knn._faiss.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="selfsup.eval.knn"):
            knn._faiss()
            knn._faiss()
    finally:
        knn._faiss.cache_clear()
    assert [r.getMessage() for r in caplog.records] == [
        "faiss-cpu and faiss-gpu-cu12 are both installed and write the same `faiss` module (the one installed "
        "last won): pip uninstall -y faiss-cpu faiss-gpu-cu12, then reinstall selfsup with one extra, "
        "'.[cpu]' or '.[gpu]'"
    ]


class GpuFaissStandIn:
    """faiss as its GPU build presents itself, searching exactly with numpy; records each GPU call."""

    METRIC_INNER_PRODUCT = 0

    def __init__(self):
        self.calls = []

    def omp_set_num_threads(self, n):
        pass

    def get_num_gpus(self):
        return 1

    def StandardGpuResources(self):  # noqa: N802 - faiss's name
        return "resources"

    def knn_gpu(self, resources, q, block, k, metric):
        self.calls.append((resources, q.dtype, block.dtype, q.flags.c_contiguous, k, metric))
        sims = q @ block.T
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, idx, 1), idx.astype(np.int64)

    def knn(self, *args, **kwargs):
        raise AssertionError("the CPU search ran where faiss has a GPU")


def test_the_faiss_gpu_glue_against_a_stand_in_index(monkeypatch):
    rng = np.random.default_rng(3)
    bank, queries = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    bank_y, query_y = rng.integers(0, 5, 300), rng.integers(0, 5, 40)
    expected = weighted_knn(bank, bank_y, queries, query_y, settings=[(20, 0.07)], num_classes=5, backend="numpy")
    fake = GpuFaissStandIn()
    monkeypatch.setattr(knn, "_faiss", lambda: fake)
    knn._gpu_resources.cache_clear()
    try:
        got = weighted_knn(bank, bank_y, queries, query_y, settings=[(20, 0.07)], num_classes=5, backend="faiss")
    finally:
        knn._gpu_resources.cache_clear()
    # unit float32 rows, C order, on the process's one GPU resource; k with a margin for exact re-ranking
    assert fake.calls and all(
        c[:4] == ("resources", np.float32, np.float32, True) and c[4] >= 20 and c[5] == 0 for c in fake.calls
    )
    assert got.top1 == expected.top1 and np.array_equal(got.predictions["knn@20"], expected.predictions["knn@20"])
