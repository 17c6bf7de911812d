"""What tests share: tiny data, one tiny experiment, one way to train it, checkpoint records.

- ``write_idx``, ``make_images``, ``write_tiny_shards``: tiny datasets made on the fly (no downloads).
- ``tiny_config(name, shards, run_root, **sections)``: the tree of a SimCLR run small enough for two
  CPU cores; ``tiny_experiment(...)`` the same parsed into an ``ExperimentConfig``.
- ``fit(cfg, resume_from=None, *sinks)``: train it in this process with the run's file sink.
- ``train_state(step, ...)``, ``save_at(run_dir, cfg, step, ...)``: checkpoint records without training.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import yaml

TINY_WAV2VEC2 = {  # wav2vec2's "method" section at test size (4-frame masks); a test adds num_negatives
    "name": "wav2vec2",
    "preset": "tiny",
    "conv_channels": 16,
    "embed_dim": 32,
    "num_heads": 2,
    "ffn_dim": 64,
    "num_layers": 2,
    "codebook_entries": 16,
    "codevector_dim": 16,
    "final_dim": 16,
    "mask_length": 4,
}


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
        images[i, y * h : (y + 1) * h, x * h : (x + 1) * h] += 150
    return images, labels


def write_tiny_shards(out: Path, sizes: list[int], seed: int = 0, split: str = "train") -> Path:
    """A shard folder whose shards hold ``sizes`` samples each."""
    from selfsup.data.shards import write_shards
    from selfsup.data.sources import encode_png

    images, labels = make_images(sum(sizes), seed)
    out.mkdir(parents=True, exist_ok=True)
    manifests, start = [], 0
    for i, n in enumerate(sizes):
        samples = (
            {"__key__": f"s{start + j:06d}", "png": encode_png(images[start + j]), "cls": int(labels[start + j])}
            for j in range(n)
        )
        manifests.append(write_shards(samples, out / f"part{i}", split=f"{split}{i}", classes=list("abcd")))
        start += n
    # merge the single-shard folders into one folder with one manifest
    shards = []
    for i, m in enumerate(manifests):
        for s in m["shards"]:
            (out / f"part{i}" / s["name"]).rename(out / s["name"])
            shards.append(s)
    for i in range(len(sizes)):
        shutil.rmtree(out / f"part{i}")
    manifest = {**manifests[0], "split": split, "shards": shards, "num_samples": sum(sizes)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def tiny_config(name: str, shards: Path | str, run_root: Path | str, **sections) -> dict:
    """A SimCLR run small enough for two CPU cores (ResNet-18 of width 4, batch 8, no loader processes);
    each keyword replaces (a value) or updates (a dict) that section."""
    tree = {
        "name": name,
        "run_root": str(run_root),
        "seed": 3,
        "data": {"train": str(shards), "batch_size": 8, "loader_workers": 0, "shuffle_buffer": 16},
        "model": {"width": 4},
        "method": {"name": "simclr"},
        "optim": {"lr": 0.1, "epochs": 1, "warmup_epochs": 0.2},
        "train": {"log_every_steps": 1, "checkpoint_every_steps": 4, "threads": 1},
        "tracking": {"mode": "disabled"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return tree


def tiny_experiment(name: str, shards: Path | str, run_root: Path | str, *overrides: str, **sections):
    """``tiny_config`` parsed, with ``key.sub=value`` ``overrides`` applied on top."""
    from selfsup.config import parse_config

    return parse_config(tiny_config(name, shards, run_root, **sections), list(overrides))


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def fit(cfg, resume_from: Path | None = None, *sinks) -> dict:
    """Train ``cfg`` in this process from ``resume_from`` (None: afresh), reporting to its run files and
    ``sinks``; the summary. The driver's checks (lease, refusals) are left out: tests of those call it."""
    from selfsup.core.reporter import FileReporter, Reporters
    from selfsup.train.trainer import Trainer

    return Trainer(cfg, Reporters(FileReporter(cfg.run_dir), *sinks), resume_from).fit()


def train_state(step: int, seq: int | None = None, samples: int | None = None, ranks: int = 1):
    """The training state after ``step`` steps of batch 8 on ``ranks`` ranks (``seq``: write order),
    with an empty optimiser."""
    from selfsup.core.checkpoint import TrainState, rng_state

    return TrainState(
        optimizer={"state": {}, "param_groups": []},
        step=step,
        epoch=0,
        step_in_epoch=step,
        samples_seen=8 * step if samples is None else samples,
        checkpoints_written=step if seq is None else seq,
        rng=[rng_state()] * ranks,
    )


def save_at(run_dir: Path, cfg, step: int, model_state: dict | None = None, keep: int = 5, fence=None, **state):
    """A checkpoint of ``run_dir`` at ``step`` (``train_state``'s keywords in ``state``) written by the
    one writer under ``fence``, with ``model_state`` (default empty), pushed to ``cfg``'s bucket when it
    has one; its path."""
    from selfsup.core.checkpoint import CheckpointWriter

    writer = CheckpointWriter(Path(run_dir), keep, cfg.run_url, fence)
    return writer.write(model_state or {}, train_state(step, **state), cfg, {})


def tiny_jpeg_run(jpeg_shards: Path, run_root: Path, *overrides: str):
    """The SimCLR ImageNet recipe shrunk to a few fp32 steps of a width-4 ResNet-18 on 32-px views of
    ``jpeg_shards`` (one epoch, no loader workers), with ``overrides`` on top."""
    from selfsup.config import load_config

    return load_config(
        "simclr-resnet50-imagenet",
        [
            f"data.train={jpeg_shards}",
            "data.image_size=32",
            "data.batch_size=4",
            "data.loader_workers=0",
            f"run_root={run_root}",
            "model.backbone=resnet18",
            "model.width=4",
            "method.proj_hidden_dim=16",
            "method.proj_dim=8",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "train.precision=fp32",
            *overrides,
        ],
    )
