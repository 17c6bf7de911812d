"""Checkpoint digests: same-size corruptions of model.pt and state.pt are each caught; a resume falls
back to the checkpoint before and keeps the damaged one aside; eval refuses it in one line."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from selfsup import cli
from selfsup.cluster.driver import pretrain
from selfsup.config import parse_config
from selfsup.core.checkpoint import (
    CheckpointCorrupt,
    CheckpointProgress,
    decide_resume,
    list_checkpoints,
    load_checkpoint,
)
from tests.helpers import tiny_config, write_config, write_tiny_shards

CORRUPTIONS = 20


def _trained(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [32])  # 4 steps of batch 8 an epoch
    cfg = parse_config(
        tiny_config(
            "sound",
            shards,
            tmp_path / "runs",
            model={"width": 2},
            method={"name": "simclr", "proj_hidden_dim": 8, "proj_dim": 4},
            train={"checkpoint_every_steps": 2},
        )
    )
    pretrain(cfg, use_ray=False)
    return cfg


def _flip(path, rng: random.Random) -> None:
    """A few random bytes of ``path`` changed in place: its size stays the same."""
    data = bytearray(path.read_bytes())
    for i in rng.sample(range(len(data)), rng.randint(1, 4)):
        data[i] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))


def test_every_same_size_corruption_is_caught_and_the_resume_falls_back(tmp_path, capsys):
    cfg = _trained(tmp_path)
    capsys.readouterr()
    good = tmp_path / "good"
    shutil.copytree(cfg.run_dir, good)
    previous, latest = [c.name for c in list_checkpoints(good)]
    rng, silent = random.Random(0), 0
    for trial in range(CORRUPTIONS):
        shutil.rmtree(cfg.run_dir)
        shutil.copytree(good, cfg.run_dir)
        damaged = cfg.run_dir / "checkpoints" / latest / ("model.pt", "state.pt")[trial % 2]
        size = damaged.stat().st_size
        _flip(damaged, rng)
        assert damaged.stat().st_size == size and list_checkpoints(cfg.run_dir)[-1].name == latest  # looks complete
        with pytest.raises(CheckpointCorrupt, match=f"{damaged} does not match its digest"):
            load_checkpoint(damaged.parent, with_state=True)
        capsys.readouterr()
        code = (
            cli.main(
                [
                    "eval",
                    str(damaged.parent),
                    "--train",
                    str(cfg.data.train),
                    "--test",
                    str(cfg.data.train),
                    "--no-baselines",
                ]
            )
            if damaged.name == "model.pt"
            else 2
        )
        err = capsys.readouterr().err
        if damaged.name == "model.pt":  # eval reads model.pt: refused in one line naming it and the one before
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
            assert f"{damaged} does not match its digest" in err and previous in err
        decided = decide_resume(cfg.run_dir)
        found = decided.checkpoint
        warned = capsys.readouterr().err.splitlines()
        assert len(warned) == 1 and f"{damaged} does not match its digest" in warned[0], warned
        assert "resuming from the checkpoint before it" in warned[0]
        silent += found is None or found.name != previous
        assert f"passed over: {latest} damaged, kept in {cfg.run_dir / 'corrupt' / latest}" in decided.reason
        assert (cfg.run_dir / "corrupt" / latest / damaged.name).read_bytes() != (
            good / "checkpoints" / latest / damaged.name
        ).read_bytes()
        assert [c.name for c in list_checkpoints(cfg.run_dir)] == [previous]
    assert silent == 0
    summary = pretrain(cfg, use_ray=False)  # the last trial's run resumes from the checkpoint before and trains on
    assert summary["steps"] == 4 and CheckpointProgress.read(list_checkpoints(cfg.run_dir)[-1]).step == 4


def test_rerunning_a_finished_run_keeps_its_final_checkpoint_and_drops_a_torn_record(tmp_path, capsys):
    shards = write_tiny_shards(tmp_path / "shards", [32])
    path = write_config(
        tmp_path / "x.yaml",
        tiny_config(
            "done",
            shards,
            tmp_path / "runs",
            model={"width": 2},
            method={"name": "simclr", "proj_hidden_dim": 8, "proj_dim": 4},
        ),
    )
    run = tmp_path / "runs" / "done"
    assert cli.main(["pretrain", str(path), "--no-ray"]) == 0
    first = json.loads((run / "summary.json").read_text())
    final = run / "checkpoints" / "samples-000000000032"
    assert first["checkpoint"] == str(final)
    records = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as f:  # a kill mid-append (a full disk) tore a record
        f.write('{"step": 5, "loss": 2.')
    capsys.readouterr()
    assert cli.main(["pretrain", str(path), "--no-ray"]) == 0
    out, err = capsys.readouterr()
    assert f"done: 4 steps, final weights in {final}," in out and "None" not in out
    assert "metrics.jsonl: dropped its last line, a record cut short by an interrupted write" in err
    again = json.loads((run / "summary.json").read_text())
    assert again["checkpoint"] == str(final) and again["last"] == first["last"] and again["steps"] == 4
    assert (run / "metrics.jsonl").read_text() == records
