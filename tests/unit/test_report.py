"""Metrics (hand-computed) and the report files."""

import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from threadpoolctl import threadpool_limits

from selfsup.core.collapse import rankme
from selfsup.eval.metrics import confusion, per_class_report, project_2d, roc_auc_ovr
from selfsup.eval.report import format_table, write_report

Y_TRUE = np.array([0, 0, 1, 1, 2])
Y_PRED = np.array([0, 1, 1, 1, 0])


def test_per_class_report_and_confusion_by_hand():
    rows = per_class_report(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert rows[0] == pytest.approx({"class": "a", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert rows[1] == pytest.approx({"class": "b", "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert rows[2] == pytest.approx({"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    np.testing.assert_array_equal(
        confusion(Y_TRUE, Y_PRED, 4), [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    )


def test_roc_auc_by_hand_skips_classes_without_positives():
    p1 = np.array([0.1, 0.4, 0.35, 0.8])  # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered
    probs = np.stack([1 - p1, p1, np.zeros(4)], 1)
    roc = roc_auc_ovr(np.array([0, 0, 1, 1]), probs)
    assert roc["per_class"] == pytest.approx({0: 0.75, 1: 0.75})
    assert roc["macro"] == pytest.approx(0.75) and roc["skipped"] == [2]
    fpr, tpr = roc["curves"][1]
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1


def test_rankme():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(50, 8)))
    assert rankme(q * 3.0) == pytest.approx(8.0, rel=1e-5)  # 8 equal singular values
    assert rankme(torch.ones(20, 6)) == pytest.approx(1.0, abs=1e-4)  # rank one
    x = np.random.default_rng(1).normal(size=(40, 5)) * [5, 2, 1, 0.5, 0.1]
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(torch.from_numpy(x).float()) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_project_2d():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 10)) * 0.1
    x[:, 3] += np.repeat([-5.0, 5.0], 30)  # the dominant direction separates two groups
    pca = project_2d(x)
    assert pca.shape == (60, 2) and (np.sign(pca[:30, 0]) != np.sign(pca[30:, 0])[0]).all()
    with threadpool_limits(limits=1):  # OpenMP t-SNE crawls when the shared cores are oversubscribed
        assert project_2d(x, "tsne").shape == (60, 2)
    with pytest.raises(ValueError, match="method"):
        project_2d(x, "umap")


def test_format_table():
    table = format_table(
        {"checkpoint": {"knn@20": 0.9731, "linear": 0.98, "rankme": 123.456}, "pixels": {"knn@20": 0.5}}
    )
    assert table.splitlines() == [
        "| encoder | knn@20 (%) | linear (%) | rankme |",
        "|---|---:|---:|---:|",
        "| checkpoint | 97.31 | 98.00 | 123.5 |",
        "| pixels | 50.00 | – | – |",
    ]


def test_the_table_shows_each_encoders_margin_over_random_init():
    table = format_table(
        {
            "checkpoint": {"knn@20": 0.8066, "linear": 0.8391},
            "random_init": {"knn@20": 0.7948, "linear": 0.7974},
            "pixels": {"knn@20": 0.8459},
        }
    )
    assert table.splitlines() == [
        "| encoder | knn@20 (%) | linear (%) | knn@20 vs random init | linear vs random init |",
        "|---|---:|---:|---:|---:|",
        "| checkpoint | 80.66 | 83.91 | +1.18 | +4.17 |",
        "| random_init | 79.48 | 79.74 | – | – |",
        "| pixels | 84.59 | – | +5.11 | – |",
    ]


def test_the_report_shows_the_training_curve_and_an_html_file_with_the_plots_inside(tmp_path):
    records = [
        {"step": s, "loss": 5.0 - s / 10, "epoch": s / 10, "total_steps": 20, "epochs": 2.0} for s in range(1, 21)
    ]
    records += [
        {
            "step": 10 * e,
            "epoch": float(e),
            "monitor/knn@20": 0.7 + 0.05 * e,
            "monitor/rankme": 20.0,
            "monitor/random_init_knn@20": 0.72,
            "monitor/pixels_knn@20": 0.79,
        }
        for e in (1, 2)
    ]
    report = write_report(
        tmp_path,
        title="run x",
        encoders={"checkpoint": {"knn@20": 0.8}, "random_init": {"knn@20": 0.75}},
        subject="simclr on fmnist",
        training={"facts": {"steps": 20, "precision": "fp32"}, "records": records},
        context=["A longer run gives more."],
    )
    assert report["files"] == {
        "training": "training.png",
        "json": "report.json",
        "markdown": "report.md",
        "html": "report.html",
    }
    assert imread(tmp_path / "training.png").shape[1] > 800
    md = (tmp_path / "report.md").read_text()
    assert "## Training\n\n- steps: 20\n- precision: fp32" in md and "A longer run gives more." in md
    assert "![training](training.png)" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 and "<td>+5.00</td>" in page and "precision: fp32" in page


def test_write_report_files(tmp_path):
    encoders = {
        "checkpoint": {"knn@20": 0.9, "knn@200": 0.88, "linear": 0.93},
        "pixels": {"knn@20": 0.6, "knn@200": 0.55, "linear": 0.7},
        "random_init": {"knn@20": 0.3, "knn@200": 0.28, "linear": 0.4},
    }
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90)
    report = write_report(
        tmp_path / "out",
        title="quickstart",
        encoders=encoders,
        details={
            "per_class": {"checkpoint": per_class_report(Y_TRUE, Y_PRED, ["a", "b", "c"])},
            "rankme": np.float32(7.5),
            "unseen": float("nan"),
        },
        class_names=["a", "b", "c"],
        confusion_matrix=confusion(Y_TRUE, Y_PRED, 3),
        roc=roc_auc_ovr(y, probs),
        embedding_2d=(rng.normal(size=(90, 2)), y),
        notes=["trained 3 epochs"],
    )
    out = tmp_path / "out"
    saved = json.loads((out / "report.json").read_text())
    assert saved["encoders"] == encoders and saved["title"] == "quickstart"
    assert saved["files"] == report["files"] and saved["notes"] == report["notes"] == ["trained 3 epochs"]
    assert saved["details"]["rankme"] == 7.5 and saved["details"]["unseen"] is None
    assert set(saved["details"]["roc_auc"]["per_class"]) == {"a", "b", "c"}
    assert saved["files"] == {
        "json": "report.json",
        "markdown": "report.md",
        "confusion": "confusion.png",
        "roc": "roc.png",
        "embedding": "embedding.png",
        "per_class": "per_class.md",
        "html": "report.html",
    }
    for png in ("confusion.png", "roc.png", "embedding.png"):
        assert imread(out / png).shape[0] > 100
    md = (out / "report.md").read_text()
    assert md.startswith("# quickstart\n") and "| random_init | 30.00 | 28.00 | 40.00 | – | – |" in md
    assert "| checkpoint | 90.00 | 88.00 | 93.00 | +60.00 | +53.00 |" in md
    assert "- trained 3 epochs" in md and "![roc](roc.png)" in md
    assert "| b | 66.67 | 100.00 | 80.00 | 2 |" in (out / "per_class.md").read_text()


def test_write_report_rejects_percentages(tmp_path):
    with pytest.raises(ValueError, match="fractions in"):
        write_report(tmp_path, title="t", encoders={"checkpoint": {"knn@20": 97.3}})
    report = write_report(tmp_path, title="t", encoders={"checkpoint": {"knn@20": 0.973}})
    assert report["files"] == {"json": "report.json", "markdown": "report.md", "html": "report.html"}
    assert not (tmp_path / "roc.png").exists()
