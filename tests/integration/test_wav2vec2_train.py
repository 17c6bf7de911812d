"""wav2vec 2.0 end to end without Ray: synthetic audio shards -> pretrain -> checkpoint -> evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from selfsup.audio.decode import encode_flac
from selfsup.config import parse_config
from selfsup.core.checkpoint import latest_checkpoint, load_checkpoint
from selfsup.data.shards import write_shards
from selfsup.eval.run import evaluate
from tests.helpers import TINY_WAV2VEC2, fit

pytestmark = pytest.mark.integration


def _clips(n: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """``n`` clips of 0.4-1.0 s: class 0 a low tone, class 1 a high one, both with noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        t = np.arange(int(16000 * rng.uniform(0.4, 1.0))) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (220 if label == 0 else 1200) * rng.uniform(0.9, 1.1) * t)
        out.append(((wave + 0.05 * rng.standard_normal(len(t))).astype(np.float32), label))
    return out


def _write(out, clips, split):
    samples = (
        {
            "__key__": f"{split}-{i:04d}",
            "flac": encode_flac(w),
            "json": {"duration": len(w) / 16000, "original_rate": 16000, "label": c},
        }
        for i, (w, c) in enumerate(clips)
    )
    return write_shards(samples, out, split=split, kind="audio", classes=["low", "high"])


def test_tiny_pretrain_writes_a_checkpoint_with_finite_loss_and_evaluates(tmp_path):
    _write(tmp_path / "train", _clips(24, 0), "train")
    _write(tmp_path / "test", _clips(10, 1), "test")
    cfg = parse_config(
        {
            "name": "w2v-tiny-test",
            "run_root": str(tmp_path / "runs"),
            "data": {
                "kind": "audio",
                "train": str(tmp_path / "train"),
                "batch_size": 4,
                "max_seconds": 0.8,
                "min_seconds": 0.3,
                "loader_workers": 0,
            },
            "method": {**TINY_WAV2VEC2, "num_negatives": 10},
            "optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "none", "warmup_epochs": 0.5, "epochs": 2},
            "train": {"log_every_steps": 2, "threads": 1},
            "eval": {"knn": [[5, 0.07]]},
        }
    )
    summary = fit(cfg)

    assert summary["steps"] == summary["total_steps"] == 12
    assert math.isfinite(summary["last"]["loss"]) and summary["bad_steps"] == 0
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("codebook_alarms" in r and math.isfinite(r["loss"]) for r in records)
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None and ckpt.name == "samples-000000000048"  # 12 steps x batch 4
    assert summary["checkpoint"] == str(ckpt) and summary["samples_seen"] == 48
    loaded, state, _ = load_checkpoint(ckpt)
    assert loaded.method.name == "wav2vec2" and loaded.method.embed_dim == 32
    assert "encoder.context.layers.0.attention.k_proj.weight" in state

    result = evaluate(cfg.run_dir, str(tmp_path / "train"), str(tmp_path / "test"), tmp_path / "report")
    assert set(result["encoders"]) == {"checkpoint", "log_mel", "random_init"}
    for scores in result["encoders"].values():
        assert 0.0 <= scores["knn@5"] <= 1.0 and 0.0 <= scores["linear"] <= 1.0
    assert result["encoders"]["log_mel"]["linear"] >= 0.9  # tones are trivially separable by their spectrum
    assert 0 <= result["details"]["checkpoint"]["layer"] <= 2
    assert (tmp_path / "report" / "report.md").is_file()
