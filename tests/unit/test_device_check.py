"""The device check's CPU dry mode runs every stage start to finish, so that the command meant for a
GPU machine cannot rot where no GPU is; with none of the packages the device image lacks and
``make device-carry`` does not carry importable."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from benchmarks.device_check import METHODS, main
from selfsup.eval import knn
from tests.helpers import make_images, write_idx

NOT_ON_THE_DEVICE = [
    "ray",
    "wandb",
    "faiss",
    "sklearn",
    "matplotlib",
    "scipy",
    "pandas",
    "rich",
    "lightly",
    "transformers",
    "moto",
]


def fashion_mnist_like(folder, train: int = 64, test: int = 32):
    folder.mkdir()
    for prefix, n, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = make_images(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gz=True)
    return folder


@pytest.fixture
def faiss_looked_up_afresh():
    """kNN caches whether faiss imports: what it found with faiss unimportable must not outlive the test."""
    knn._faiss.cache_clear()
    yield
    knn._faiss.cache_clear()


def test_the_dry_mode_runs_every_stage_and_writes_one_json(tmp_path, capsys, monkeypatch, faiss_looked_up_afresh):
    for name in NOT_ON_THE_DEVICE:  # `import name` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "device-check.json"
    result = main(["--dry", "--fmnist", str(fashion_mnist_like(tmp_path / "fmnist")), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    stages = result["stages"]
    assert list(stages) == ["cuda_tests", "throughput", "fmnist", "wav2vec2"]
    assert [name for name, s in stages.items() if not s["ok"]] == [], {n: s.get("error") for n, s in stages.items()}
    assert result["dry"] and result["commit"]
    cuda = stages["cuda_tests"]  # no GPU here: every cuda test skips, none fails
    assert "tests/unit/test_cuda.py" in cuda["files"] and cuda["failed"] == 0 and cuda["skipped"] > 5
    runs = stages["throughput"]["runs"]
    assert list(runs) == ["compile off", "compile on"]
    assert all(r["pairs_per_s"] > 0 and 0 <= r["data_wait"] < 1 and 0 < r["mfu"] < 1 for r in runs.values())
    assert stages["throughput"]["gflop_per_pair"] > 0
    assert list(stages["fmnist"]["methods"]) == METHODS
    for method, r in stages["fmnist"]["methods"].items():
        assert r["steps"] == 3 and r["images_per_s"] > 0 and 0 <= r["knn@20"] <= 1, method
        assert {"pixels_knn@20", "random_init_knn@20"} <= r.keys()
    w2v = stages["wav2vec2"]
    assert w2v["steps_per_s"] > 0 and len(w2v["losses"]) == 3 and all(np.isfinite(w2v["losses"]))
    printed = capsys.readouterr().out
    assert "[dry: what the device run measures]" in printed and f"wrote {out}" in printed
