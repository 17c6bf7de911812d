"""Shared fixtures: tiny idx datasets and shard folders made on the fly (no downloads)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an idx file, gzipped when ``gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_images(n: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of 4 easy classes (a bright square in one quadrant) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(labels):
        y, x = divmod(int(c), 2)
        images[i, y * h:(y + 1) * h, x * h:(x + 1) * h] += 150
    return images, labels


def write_tiny_shards(out: Path, sizes: list[int], seed: int = 0, split: str = "train") -> Path:
    """A shard folder whose shards hold ``sizes`` samples each."""
    from selfsup.data.shards import write_shards
    from selfsup.data.sources import encode_png

    images, labels = make_images(sum(sizes), seed)
    out.mkdir(parents=True, exist_ok=True)
    manifests, start = [], 0
    for i, n in enumerate(sizes):
        samples = ({"__key__": f"s{start + j:06d}", "png": encode_png(images[start + j]), "cls": int(labels[start + j])}
                   for j in range(n))
        manifests.append(write_shards(samples, out / f"part{i}", split=f"{split}{i}", classes=list("abcd")))
        start += n
    # merge the single-shard folders into one folder with one manifest
    shards = []
    for i, m in enumerate(manifests):
        for s in m["shards"]:
            (out / f"part{i}" / s["name"]).rename(out / s["name"])
            shards.append(s)
    import json
    import shutil

    for i in range(len(sizes)):
        shutil.rmtree(out / f"part{i}")
    manifest = {**manifests[0], "split": split, "shards": shards, "num_samples": sum(sizes)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets an empty ``SELFSUP_CACHE`` (decoded splits, baseline scores, mirrored runs)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    return write_tiny_shards(tmp_path / "shards", [30, 50, 10, 40, 25, 35, 60])


def progress_at(step: int, seq: int | None = None, samples: int | None = None) -> dict:
    """A checkpoint's progress record after ``step`` steps of batch 8 on one rank (``seq`` = write order)."""
    return {"seq": step if seq is None else seq, "samples_seen": 8 * step if samples is None else samples,
            "step": step, "epoch": 0, "step_in_epoch": step, "world_size": 1}
