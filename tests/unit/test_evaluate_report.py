"""evaluate() on tiny shards and a tiny checkpoint: every report part, refusals with clear messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfsup.config import parse_config
from selfsup.data.shards import write_shards
from selfsup.data.sources import encode_png
from selfsup.eval.run import evaluate
from selfsup.tasks.vision import VisionTask
from tests.helpers import make_images, save_at


def shards(out, images, labels):
    samples = (
        {"__key__": f"s{i:05d}", "png": encode_png(img), "cls": int(c)}
        for i, (img, c) in enumerate(zip(images, labels))
    )
    write_shards(samples, out, classes=list("abcd"))
    return str(out)


def tiny_checkpoint(tmp_path, train: str, spoil: bool = False):
    """A step-7 checkpoint of a random-init SimCLR (width 4); ``spoil`` puts NaN in its first conv."""
    cfg = parse_config(
        {
            "name": "tiny",
            "run_root": str(tmp_path / "runs"),
            "data": {"train": train},
            "model": {"width": 4},
            "method": {"name": "simclr", "proj_hidden_dim": 16, "proj_dim": 8},
            "tracking": {"mode": "disabled"},
        }
    )
    torch.manual_seed(0)
    state = VisionTask().build_objective(cfg).state_dict()
    if spoil:
        first = next(k for k, v in state.items() if v.ndim == 4)
        state[first] = torch.full_like(state[first], float("nan"))
    return save_at(cfg.run_dir, cfg, 7, state, keep=1)


@pytest.fixture
def split(tmp_path):
    """Train shards without class "d" (3); test shards with it."""
    x, y = make_images(260, seed=1)
    keep = y[:200] != 3
    return (
        shards(tmp_path / "train", x[:200][keep], y[:200][keep]),
        shards(tmp_path / "test", x[200:], y[200:]),
        y[200:],
    )


def test_report_has_every_part(tmp_path, split):
    train, test, test_y = split
    report = evaluate(tiny_checkpoint(tmp_path, train), train, test, tmp_path / "report", tsne=True, threads=1)
    out = tmp_path / "report"
    saved = json.loads((out / "report.json").read_text())
    assert saved["encoders"]["checkpoint"]["map"] == pytest.approx(report["encoders"]["checkpoint"]["map"])
    assert set(saved["encoders"]) == {"checkpoint", "pixels", "random_init"}
    ckpt = saved["encoders"]["checkpoint"]
    for key in ("knn@20", "knn@200", "linear", "recall@1", "recall@5", "recall@10", "precision@5", "map@r", "map"):
        assert 0.0 <= ckpt[key] <= 1.0, key
    assert ckpt["recall@1"] <= ckpt["recall@5"] <= ckpt["recall@10"]
    assert {"knn@20", "linear"} <= set(saved["encoders"]["pixels"]) and "map" not in saved["encoders"]["pixels"]
    # class "d" is in test only: flagged, and its recall is 0 (nothing can predict it)
    assert saved["details"]["classes_only_in_test"] == [3]
    assert any("only in test" in n and "'d'" in n for n in saved["notes"])
    rows = {r["class"]: r for r in saved["details"]["per_class"]}
    assert rows["d"]["recall"] == 0 and rows["d"]["support"] == int((test_y == 3).sum())
    assert sum(r["support"] for r in rows.values()) == len(test_y)
    hp = saved["details"]["checkpoint"]["linear_hparams"]
    assert any(
        f"lr={hp['lr']:g}" in n and "4 views per train image (un-augmented, then 3 of crops and flips)" in n
        for n in saved["notes"]
    )
    assert set(saved["details"]["roc_auc"]["per_class"]) == {"a", "b", "c", "d"}
    for name in ("confusion.png", "roc.png", "embedding.png", "embedding-tsne.png", "neighbours.png"):
        assert (out / name).stat().st_size > 1000, name
    md = (out / "report.md").read_text()
    assert "| d | 0.00 |" in md and "![neighbours](neighbours.png)" in md and "recall@10 (%)" in md
    assert "predictions" not in saved["details"]["checkpoint"]  # per-query arrays stay out of the JSON


def test_empty_split_is_refused(tmp_path, split):
    train, _, _ = split
    (tmp_path / "empty").mkdir()  # (`shards write` refuses to write one)
    (tmp_path / "empty" / "manifest.json").write_text(
        '{"format": "image", "classes": [], "shards": [], "num_samples": 0}'
    )
    empty = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="split is empty"):
        evaluate(tiny_checkpoint(tmp_path, train), train, empty, tmp_path / "r", baselines=False)


def test_nan_features_name_the_cause(tmp_path, split):
    train, test, _ = split
    with pytest.raises(ValueError, match=r"checkpoint, train\): \d+ of \d+ feature rows are NaN.*diverged"):
        evaluate(tiny_checkpoint(tmp_path, train, spoil=True), train, test, tmp_path / "r", baselines=False)


def test_probe_features_are_the_plain_features_then_seeded_crops():
    from selfsup.config import ViewRecipe
    from selfsup.tasks.vision import extract_features, probe_features
    from selfsup.vision.augment import BatchViews

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    images = torch.from_numpy(make_images(40, seed=5)[0])[:, None]  # (40, 1, 28, 28) uint8
    views = BatchViews([ViewRecipe(blur_p=1.0)], 28, [0.3], [0.3])  # the method's views are not the probe's
    rows = probe_features(encoder, images, views, 3, seed=1)
    assert rows.shape == (120, 12)
    np.testing.assert_array_equal(rows[:40], extract_features(encoder, images, views))
    assert not np.allclose(rows[40:80], rows[:40]) and not np.allclose(rows[80:], rows[40:80])
    np.testing.assert_array_equal(rows, probe_features(encoder, images, views, 3, seed=1))  # seeded
    assert not np.array_equal(rows[40:], probe_features(encoder, images, views, 3, seed=2)[40:])
    np.testing.assert_array_equal(probe_features(encoder, images, views, 1), rows[:40])


@pytest.mark.parametrize("seconds_at, expected", [({2: 0.03, 1: 0.01}, 1), ({2: 0.01, 1: 0.03}, 2)])
def test_evaluation_keeps_the_thread_count_that_computes_features_faster(
    tmp_path, split, monkeypatch, caplog, seconds_at, expected
):
    import time

    import selfsup.eval.run as run

    train, _, _ = split
    cfg = parse_config(
        {
            "name": "tiny",
            "run_root": str(tmp_path / "runs"),
            "data": {"train": train},
            "model": {"width": 4},
            "method": {"name": "simclr"},
            "tracking": {"mode": "disabled"},
        }
    )
    timed = []

    def features_at_this_count(task, encoder, sample, cfg, desc, probe_views=1, progress=True):
        timed.append((torch.get_num_threads(), len(sample.labels)))
        time.sleep(seconds_at[torch.get_num_threads()])
        return []

    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(run, "split_features", features_at_this_count)
    previous, labelled = torch.get_num_threads(), VisionTask().read_labelled(train, cfg)
    try:
        with caplog.at_level("WARNING", logger="selfsup.evaluate"):
            chosen = run.fastest_threads(VisionTask(), cfg, labelled)
    finally:
        torch.set_num_threads(previous)
    assert chosen == expected
    assert [count for count, _ in timed] == [2, 1, 2, 1]
    assert {n for _, n in timed} == {len(labelled.labels)} and len(labelled.labels) < run.THREAD_TRIAL
    assert ("evaluating with 1 of 2 CPU threads" in caplog.text) == (expected == 1)
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {0})
    assert run.fastest_threads(VisionTask(), cfg, labelled) == 1 and len(timed) == 4  # one CPU: nothing to time


def test_baselines_are_scored_once_for_the_same_shards_and_config(tmp_path, split, monkeypatch):
    import os

    import selfsup.eval.run as run

    train, test, _ = split
    ckpt = tiny_checkpoint(tmp_path, train)
    first = evaluate(ckpt, train, test, tmp_path / "r1", threads=1)["encoders"]
    computed = []
    real = run.baseline_features
    monkeypatch.setattr(run, "baseline_features", lambda *a: computed.append(1) or real(*a))
    again = evaluate(ckpt, train, test, tmp_path / "r2", threads=1)["encoders"]
    assert computed == []  # from the cache, with the same scores
    assert again["pixels"] == first["pixels"] and again["random_init"] == first["random_init"]
    assert again["checkpoint"]["knn@20"] == first["checkpoint"]["knn@20"]
    saved = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert (
        saved["details"]["pixels"]["linear_hparams"]
        == json.loads((tmp_path / "r1" / "report.json").read_text())["details"]["pixels"]["linear_hparams"]
    )
    shard = next(p for p in os.scandir(test) if p.name.endswith(".tar"))
    os.utime(shard.path, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a rewritten shard
    evaluate(ckpt, train, test, tmp_path / "r3", threads=1)
    assert computed == [1]  # new content, new key: scored again
