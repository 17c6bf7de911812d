"""A test split that is not held out from the train split is flagged, in the report's notes and on the
console: the same folder, a copy of the same shards, test samples also in train; a held-out split is not."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from selfsup.config import parse_config
from selfsup.data.shards import write_shards
from selfsup.data.sources import encode_png
from selfsup.eval.overlap import held_out_warnings, overlap
from selfsup.eval.run import evaluate
from selfsup.tasks.vision import VisionTask
from tests.helpers import make_images, save_at

CFG = {
    "name": "tiny",
    "data": {"train": "x", "channels": 1, "image_size": 28},
    "model": {"width": 4},
    "method": {"name": "simclr", "proj_hidden_dim": 16, "proj_dim": 8},
    "tracking": {"mode": "disabled"},
    "eval": {"knn": [[20, 0.07]]},
}


def shards(out, images: np.ndarray, labels: np.ndarray, per_shard: int = 40) -> str:
    samples = (
        {"__key__": f"s{i:05d}", "png": encode_png(img), "cls": int(c)}
        for i, (img, c) in enumerate(zip(images, labels))
    )
    write_shards(samples, out, classes=list("abcd"), samples_per_shard=per_shard)
    return str(out)


@pytest.fixture
def folders(tmp_path) -> dict[str, str]:
    """Shard folders: train (100 images in 3 shards), test (60 others), a byte copy of train, and
    "mixed": 30 others plus 7 train images, sharded differently from train."""
    x, y = make_images(190, seed=3)
    train = shards(tmp_path / "train", x[:100], y[:100])
    shutil.copytree(train, tmp_path / "copy")
    mixed = np.r_[x[160:190], x[10:17]], np.r_[y[160:190], y[10:17]]
    return {
        "train": train,
        "test": shards(tmp_path / "test", x[100:160], y[100:160]),
        "copy": str(tmp_path / "copy"),
        "mixed": shards(tmp_path / "mixed", *mixed, per_shard=25),
    }


def read(location: str):
    cfg = parse_config(CFG)
    return VisionTask().read_labelled(location, cfg)


def test_the_same_folder_by_another_name_is_flagged(folders, tmp_path):
    (tmp_path / "link").symlink_to(folders["train"])
    reason = overlap(read(folders["train"]), read(str(tmp_path / "link") + "/"))
    assert (
        reason == f"--train and --test are the same shards (the same folder {tmp_path / 'link'}/): "
        "kNN and probe scores are not held-out"
    )


def test_a_copy_of_the_shards_is_flagged_by_their_checksums(folders):
    reason = overlap(read(folders["train"]), read(folders["copy"]))
    assert reason.startswith(
        f"--train and --test are the same shards (every shard of {folders['copy']} has the "
        f"sha256 of one of {folders['train']})"
    )


def test_test_samples_also_in_train_are_counted(folders):
    reason = overlap(read(folders["train"]), read(folders["mixed"]))
    assert (
        reason == "7 of 37 --test samples are also in --train (the same decoded content): "
        "kNN and probe scores are not held-out for them"
    )


def test_a_held_out_split_gives_no_warning(folders, caplog):
    with caplog.at_level(logging.WARNING, logger="selfsup.evaluate"):
        assert held_out_warnings(read(folders["train"]), read(folders["test"])) == []
    assert not caplog.records


@pytest.mark.parametrize(
    "test_split, warned",
    [("train", "the same shards (the same folder"), ("copy", "the same shards (every shard of"), ("test", None)],
)
def test_the_report_and_the_console_say_it(tmp_path, folders, caplog, test_split, warned):
    cfg = parse_config({**CFG, "run_root": str(tmp_path / "runs"), "data": {**CFG["data"], "train": folders["train"]}})
    torch.manual_seed(0)
    ckpt = save_at(cfg.run_dir, cfg, 1, VisionTask().build_objective(cfg).state_dict(), keep=1)
    with caplog.at_level(logging.WARNING, logger="selfsup.evaluate"):
        evaluate(ckpt, folders["train"], folders[test_split], tmp_path / "report", baselines=False, threads=1)
    notes = json.loads((tmp_path / "report" / "report.json").read_text())["notes"]
    flagged = [n for n in notes if n.startswith("warning: --train and --test")]
    logged = [r.getMessage() for r in caplog.records if "--train and --test" in r.getMessage()]
    if warned is None:
        assert flagged == logged == []
    else:
        assert len(flagged) == len(logged) == 1 and warned in logged[0] and flagged[0] == f"warning: {logged[0]}"
        assert flagged[0].endswith(": kNN and probe scores are not held-out")
        assert warned in (tmp_path / "report" / "report.md").read_text()
