"""The training loop skips NaN/inf losses, counts them, and stops after too many in a row."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from selfsup.config import parse_config
from selfsup.core.checkpoint import latest_checkpoint, load_checkpoint
from selfsup.core.reporter import FileReporter, Reporters
from selfsup.train.trainer import TooManyBadSteps, Trainer
from selfsup.methods.simclr import SimCLR
from tests.conftest import write_tiny_shards


def tiny_config(tmp_path, *overrides):
    shards = write_tiny_shards(tmp_path / "shards", [64, 64])
    tree = {"name": "bad", "run_root": str(tmp_path / "runs"),
            "data": {"train": str(shards), "batch_size": 16, "loader_workers": 0, "shuffle_buffer": 0},
            "model": {"width": 4}, "method": {"name": "simclr", "proj_hidden_dim": 16, "proj_dim": 8},
            "optim": {"warmup_epochs": 0, "epochs": 1, "max_bad_steps": 3},
            "train": {"precision": "fp32", "log_every_steps": 2, "checkpoint_every_steps": 1000}}
    return parse_config(tree, list(overrides))


def train(cfg):
    return Trainer(cfg, Reporters(FileReporter(cfg.run_dir)), resume_from=None).fit()


def test_a_diverging_run_stops_after_max_bad_steps(tmp_path):
    cfg = tiny_config(tmp_path, "optim.lr=1e30")  # the first update sends the weights to ~1e30: NaN from then on
    with pytest.raises(TooManyBadSteps, match=r"for \d+ steps in a row by step \d+ \(limit optim.max_bad_steps=3\)") as err:
        train(cfg)
    assert "lower optim.lr" in str(err.value)


@pytest.mark.parametrize("optimiser", ["lars", "sgd", "adamw"])
def test_isolated_bad_losses_are_skipped_and_counted(tmp_path, monkeypatch, optimiser):
    cfg = tiny_config(tmp_path, f"optim.name={optimiser}")
    calls = {"n": 0}
    forward = SimCLR.forward

    def sometimes_nan(self, views, progress):
        out = forward(self, views, progress)
        calls["n"] += 1
        if calls["n"] in (2, 4, 5):  # never 3 in a row
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "forward", sometimes_nan)
    summary = train(cfg)
    assert summary["steps"] == summary["total_steps"] == 8 and summary["bad_steps"] == 3
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bad_steps"] == 3
    _, model_state, _ = load_checkpoint(latest_checkpoint(cfg.run_dir))
    assert all(torch.isfinite(v).all() for v in model_state.values() if v.is_floating_point())


def test_the_loop_warns_when_embeddings_collapse(tmp_path, monkeypatch, caplog):
    cfg = tiny_config(tmp_path)
    forward = SimCLR.forward

    def collapsing(self, views, progress):
        out = forward(self, views, progress)
        if progress.step >= 4:  # from step 5 on every sample has the same embedding
            out["embedding"] = torch.ones_like(out["embedding"]) + 1e-6 * torch.randn_like(out["embedding"])
        return out

    monkeypatch.setattr(SimCLR, "forward", collapsing)
    with caplog.at_level(logging.WARNING, logger="selfsup.collapse"):
        train(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["collapse_alarms"] for r in records] == [0, 0, 1, 0]  # logged at steps 2, 4, 6, 8; warned once
    assert len(caplog.records) == 1 and "representation collapse: embed_std" in caplog.records[0].getMessage()
