"""W&B tracking, offline only (no network): the pretrain run and each eval run read back from the
offline run folders wandb writes, nothing started for a refused run, online without credentials
refused in one line, the tracking config."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from selfsup import cli
from selfsup.config import ConfigError, dump_config, parse_config
from selfsup.tracking.wandb_run import WandbReporter, check_credentials, log_eval_report, run_id
from tests.helpers import tiny_config, write_config

BLOCK, HEADER = 32768, 7  # the .wandb file: leveldb-log blocks of records, after a 7-byte file header


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """wandb's own folders in tmp_path, no credentials, offline."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    for var, name in (
        ("WANDB_DIR", "wandb-dir"),
        ("WANDB_DATA_DIR", "wandb-data"),
        ("WANDB_CACHE_DIR", "wandb-cache"),
        ("WANDB_CONFIG_DIR", "wandb-config"),
    ):
        monkeypatch.setenv(var, str(tmp_path / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def records(run_folder: Path) -> list:
    """The records (``wandb_internal_pb2.Record``) of an offline run folder's ``run-<id>.wandb`` file."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # wandb's service may still be writing the file when run.finish() returns
    (path,) = run_folder.glob("run-*.wandb")
    data, pos, chunks, out = path.read_bytes(), HEADER, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the block's padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a record's only or last chunk
            out.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return out


def of_type(recs: list, kind: str) -> list:
    return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]


def history_keys(recs: list) -> set[str]:
    """The logged keys (a media value's parts are nested under its key)."""
    return {item.key or item.nested_key[0] for h in of_type(recs, "history") for item in h.item}


def fake_checkpoint(cfg, samples: int, step: int) -> Path:
    """A complete checkpoint folder of ``cfg``'s run (its files stand-ins), as ``resolve_checkpoint`` accepts."""
    path = cfg.run_dir / "checkpoints" / f"samples-{samples:012d}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(cfg))
    (path / "model.pt").write_bytes(b"weights" * 100)
    sizes = {f.name: f.stat().st_size for f in path.iterdir()}
    (path / "progress.json").write_text(
        json.dumps({"seq": step, "step": step, "samples_seen": samples, "files": sizes})
    )
    return path


def offline_runs(cfg) -> dict[str, Path]:
    """The run's offline W&B run folders, by W&B run id."""
    return {p.name.rsplit("-", 1)[1]: p for p in (cfg.run_dir / "wandb").glob("offline-run-*")}


def test_the_pretrain_run_has_the_group_tags_checkpoint_artifacts_and_a_sync_line(tmp_path, capsys):
    cfg = parse_config(
        tiny_config(
            "wb",
            tmp_path / "shards",
            tmp_path / "runs",
            tracking={"mode": "offline", "tags": ["ablation", "fmnist"], "log_checkpoints": True},
        )
    )
    reporter = WandbReporter(cfg)
    assert not cfg.run_dir.exists()  # nothing until start
    reporter.start()
    reporter.log(1, {"loss": 2.5, "monitor/knn": 0.3})
    reporter.checkpoint(1, None, {"loss": 2.5})  # another rank's call: nothing
    reporter.checkpoint(1, fake_checkpoint(cfg, 8, 1), {"loss": 2.5})
    reporter.finish({"steps": 1, "data": {"skipped": 0}})
    ((wid, folder),) = offline_runs(cfg).items()
    assert wid == run_id(cfg.run_dir)
    recs = records(folder)
    (run,) = of_type(recs, "run")
    assert (run.run_group, run.job_type, list(run.tags)) == ("wb", "pretrain", ["ablation", "fmnist"])
    (artifact,) = of_type(recs, "artifact")
    assert (artifact.name, artifact.type) == ("wb", "model")
    assert sorted(artifact.aliases) == ["latest", "samples-000000000008"]
    assert {"train/loss", "monitor/knn"} <= history_keys(recs)
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == f"W&B run saved offline in {folder}; upload it with: wandb sync {folder}"
    )


def test_each_eval_is_a_new_run_in_the_training_runs_group(tmp_path, capsys):
    from PIL import Image

    cfg = parse_config(tiny_config("wb", tmp_path / "shards", tmp_path / "runs", tracking={"mode": "offline"}))
    training_id = run_id(cfg.run_dir)
    ckpt = fake_checkpoint(cfg, 80, 10)
    out = tmp_path / "report"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "confusion.png")
    report = {
        "encoders": {"simclr": {"knn_top1": 0.8, "linear_top1": 0.85}, "pixels": {"knn_top1": 0.6}},
        "files": {"confusion": "confusion.png", "report": "report.md"},
        "details": {
            "checkpoint_path": str(ckpt),
            "checkpoint": {"linear_hparams": {"lr": 0.1}},
            "per_class": [{"class": "a", "f1": 0.9}, {"class": "b", "f1": 0.7}],
        },
    }
    log_eval_report(report, out)
    log_eval_report(report, out)
    runs = offline_runs(cfg)
    assert len(runs) == 2 and training_id not in runs  # never the training run's history
    lines = capsys.readouterr().out.splitlines()
    for wid, folder in runs.items():
        recs = records(folder)
        (run,) = of_type(recs, "run")
        assert (run.run_id, run.run_group, run.job_type) == (wid, "wb", "eval")
        assert {
            "eval/step",
            "eval/simclr/knn_top1",
            "eval/pixels/knn_top1",
            "eval/confusion",
            "eval/scores",
            "eval/per_class",
        } <= history_keys(recs)
        assert f"W&B run saved offline in {folder}; upload it with: wandb sync {folder}" in lines


def test_a_pretrain_refused_for_a_bad_data_path_starts_no_wandb_run(tmp_path, capsys):
    tree = tiny_config("wb", tmp_path / "missing", tmp_path / "runs", tracking={"mode": "offline"})
    assert cli.main(["pretrain", str(write_config(tmp_path / "wb.yaml", tree)), "--no-ray"]) == 2
    assert "missing" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "wb"
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id").exists()


@pytest.mark.parametrize("command", ["pretrain", "eval", "selfsup.pretrain"])
def test_online_without_credentials_ends_in_one_line_before_anything_runs(tmp_path, command):
    tree = tiny_config("wb", tmp_path / "shards", tmp_path / "runs", tracking={"mode": "online"})
    if command == "pretrain":
        args = ["pretrain", str(write_config(tmp_path / "wb.yaml", tree)), "--no-ray"]
    elif command == "selfsup.pretrain":  # the library's door is the command line's: the same check, in it
        args = [
            "-c",
            "import sys, selfsup; from selfsup.config import load_config; from selfsup.errors import "
            "OneLineError\ntry: selfsup.pretrain(load_config(sys.argv[1]), use_ray=False)\nexcept OneLineError "
            "as err: sys.exit(f'selfsup: error: {err}')",
            str(write_config(tmp_path / "wb.yaml", tree)),
        ]
    else:
        args = ["eval", str(fake_checkpoint(parse_config(tree), 8, 1)), "--train", "x", "--test", "y"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "netrc"), WANDB_CONFIG_DIR=str(tmp_path / "cfg"))  # no netrc, no settings
    cli = [] if command == "selfsup.pretrain" else ["-m", "selfsup.cli"]
    done = subprocess.run(
        [sys.executable, *cli, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == (1 if command == "selfsup.pretrain" else 2) and len(lines) == 1, done.stderr
    assert (
        lines[0].startswith("selfsup: error: tracking.mode=online")
        and "WANDB_API_KEY" in lines[0]
        and "`wandb login`" in lines[0]
    )
    assert sorted(p.name for p in (tmp_path / "runs" / "wb").glob("*")) == (
        [] if command != "eval" else ["checkpoints"]
    )


def test_a_netrc_entry_counts_as_credentials(tmp_path):
    from wandb.sdk import wandb_setup

    host = urlsplit(wandb_setup.singleton().settings.base_url).netloc
    (tmp_path / "netrc").write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    check_credentials("online")  # no error, and no network


def test_tracking_group_tags_and_checkpoints_are_config_keys(tmp_path):
    tree = tiny_config("wb", tmp_path, tmp_path)
    t = parse_config(tree).tracking
    assert (t.group, t.tags, t.log_checkpoints) == (None, [], False)
    t = parse_config(tree, ["tracking.group=sweep-1", "tracking.tags=[a, b]", "tracking.log_checkpoints=true"]).tracking
    assert (t.group, t.tags, t.log_checkpoints) == ("sweep-1", ["a", "b"], True)
    for bad in ("tracking.tags=['']", f"tracking.tags=[{'x' * 65}]"):
        with pytest.raises(ConfigError, match="tracking.tags"):
            parse_config(tree, [bad])
    assert yaml.safe_load(dump_config(parse_config(tree)))["tracking"]["log_checkpoints"] is False
