"""`selfsup submit` end to end: a token-authenticated local Ray head, a tiny job, its outputs, no leaked secret."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from selfsup.core.checkpoint import latest_checkpoint
from tests.clusterkit import ray_head
from tests.helpers import tiny_config, write_config, write_tiny_shards

pytestmark = pytest.mark.integration
SELFSUP = str(Path(sys.executable).with_name("selfsup"))


def _files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle.encode() in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def test_submit_runs_the_job_and_no_secret_leaks(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [24, 40])
    cfg = write_config(
        tmp_path / "job.yaml", tiny_config("submitted", shards, tmp_path / "runs", tracking={"mode": "offline"})
    )
    wandb_key, other = "wandbfake" + secrets.token_hex(8), "othersecret" + secrets.token_hex(8)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    # the cluster side: a plain `ray start` at Ray's default log level (its runtime-env agent logs every job's
    # env_vars at INFO), so secrets must not travel in env_vars
    env.pop("RAY_LOGGER_LEVEL", None)
    with ray_head(env) as (url, _, ray_temp):
        client_env = {**env, "WANDB_API_KEY": wandb_key, "SELFSUP_TEST_SECRET": other}
        # without the token the dashboard refuses us, with a message that says what to set
        denied = subprocess.run(
            [SELFSUP, "jobs", "status", "raysubmit_x", "--address", url],
            capture_output=True,
            text=True,
            env={**client_env, "RAY_AUTH_TOKEN": "0" * 64},
            timeout=60,
        )
        assert denied.returncode == 2 and "selfsup: error" in denied.stderr

        done = subprocess.run(
            [
                SELFSUP,
                "submit",
                str(cfg),
                "train.checkpoint_every_steps=3",
                "--address",
                url,
                "--env",
                "SELFSUP_TEST_SECRET",
            ],
            capture_output=True,
            text=True,
            env=client_env,
            timeout=300,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        job_id = next(w for w in done.stdout.split() if w.startswith("raysubmit_"))
        assert f"job {job_id}: SUCCEEDED" in done.stdout and "done: 8 steps" in done.stdout

        status = subprocess.run(
            [SELFSUP, "jobs", "status", job_id, "--address", url], capture_output=True, text=True, env=env, timeout=60
        )
        assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
        logs = subprocess.run(
            [SELFSUP, "jobs", "logs", job_id, "--address", url], capture_output=True, text=True, env=env, timeout=60
        ).stdout
        assert "done: 8 steps" in logs

        run = tmp_path / "runs" / "submitted"
        final = run / "checkpoints" / "samples-000000000064"  # 8 steps x batch 8, one worker
        assert (final / "model.pt").is_file() and latest_checkpoint(run) == final
        assert f"done: 8 steps, final weights in {final}," in done.stdout
        assert json.loads((run / "summary.json").read_text())["steps"] == 8
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 8
        assert list((run / "wandb").glob("offline-run-*"))  # W&B ran, offline, under the run directory
        # control: this cluster's runtime-env agent does write the job's env_vars into its log
        agent_logs = "".join(p.read_text() for p in ray_temp.glob("session_latest/logs/runtime_env_agent*.log"))
        assert '"RAY_TRAIN_V2_ENABLED": "1"' in agent_logs
        for secret in (wandb_key, other):
            assert secret not in out and secret not in logs
            assert _files_containing(tmp_path, secret) == []  # configs, checkpoints, metrics, W&B files
            assert _files_containing(ray_temp, secret) == []  # every file of Ray's session: logs, state, spills
