"""compare(): every checkpoint of two tiny runs, the table, the plot, the best one, cached features."""

from __future__ import annotations

import json
import shutil

import torch

from selfsup.cli import main
from selfsup.config import parse_config
from selfsup.eval import compare as compare_module
from selfsup.tasks.vision import VisionTask
from tests.helpers import save_at, write_tiny_shards


def tiny_run(tmp_path, name: str, train: str, steps: list[int]):
    cfg = parse_config(
        {
            "name": name,
            "run_root": str(tmp_path / "runs"),
            "data": {"train": train},
            "model": {"width": 4},
            "method": {"name": "simclr", "proj_hidden_dim": 16, "proj_dim": 8},
            "tracking": {"mode": "disabled"},
            "eval": {"knn": [[20, 0.07]]},
        }
    )
    for seed, step in enumerate(steps):
        torch.manual_seed(seed)
        save_at(cfg.run_dir, cfg, step, VisionTask().build_objective(cfg).state_dict(), keep=5)
    return cfg.run_dir


def test_compare_two_runs_names_the_best_and_reuses_features(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    train = str(write_tiny_shards(tmp_path / "train", [60, 60]))
    test = str(write_tiny_shards(tmp_path / "test", [40], seed=1, split="test"))
    runs = [tiny_run(tmp_path, "a", train, [10, 20]), tiny_run(tmp_path, "b", train, [5])]
    out = tmp_path / "cmp"
    assert main(["eval", "compare", *map(str, runs), "--train", train, "--test", test, "--out", str(out)]) == 0
    saved = json.loads((out / "compare.json").read_text())
    rows = saved["checkpoints"]
    assert [(r["run"], r["step"]) for r in rows] == [("a", 10), ("a", 20), ("b", 5)]
    assert all(0 <= r["linear"] <= 1 and 0 <= r["knn@20"] <= 1 for r in rows)
    assert saved["best"] == max(rows, key=lambda r: (r["linear"], r["step"]))
    assert saved["best"]["checkpoint"] in (out / "compare.md").read_text()
    assert (out / "compare.md").read_text().count("| a @ ") == 2
    assert (out / "compare.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "features" / "a").iterdir()) == [
        "samples-000000000080.npz",
        "samples-000000000160.npz",
    ]

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(compare_module, "model_features", no_extraction)
    again = compare_module.compare(runs, train, test, out)
    assert [r["linear"] for r in again["checkpoints"]] == [r["linear"] for r in rows]


def test_compare_refuses_a_folder_without_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "compare", str(tmp_path / "empty"), "--train", "x", "--test", "y"]) == 2


def test_a_checkpoint_pruned_by_its_live_run_is_skipped_and_the_computed_scores_kept(tmp_path, monkeypatch, caplog):
    torch.set_num_threads(1)
    train = str(write_tiny_shards(tmp_path / "train", [60, 60]))
    test = str(write_tiny_shards(tmp_path / "test", [40], seed=1, split="test"))
    runs = [tiny_run(tmp_path, "a", train, [10, 20, 30]), tiny_run(tmp_path, "b", train, [5])]
    load = compare_module.load_checkpoint

    def pruned_meanwhile(ckpt):  # the live run prunes its oldest checkpoints while the first is scored
        if ckpt.name == "samples-000000000160":
            shutil.rmtree(ckpt)
        return load(ckpt)

    monkeypatch.setattr(compare_module, "load_checkpoint", pruned_meanwhile)
    result = compare_module.compare(runs, train, test, tmp_path / "cmp")
    assert [(r["run"], r["step"]) for r in result["checkpoints"]] == [("a", 10), ("a", 30), ("b", 5)]
    assert "skipped" in caplog.text and "samples-000000000160" in caplog.text
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["step"] for r in saved["checkpoints"]] == [10, 30, 5]
