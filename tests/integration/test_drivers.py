"""Issue 17's one-node figures: a second driver is refused, a full disk stops with one line (no retry under
Ray), metrics stay monotonic across a resume, and a run without --address starts a Ray of its own."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from selfsup.cluster.driver import pretrain
from selfsup.config import parse_config
from selfsup.core.checkpoint import checkpoint_bytes, latest_checkpoint, list_checkpoints, load_checkpoint
from tests.clusterkit import ray_head
from tests.helpers import tiny_config, write_config, write_tiny_shards
from tests.integration.test_determinism import Crash, train

pytestmark = pytest.mark.integration
SELFSUP = str(Path(sys.executable).with_name("selfsup"))
ERROR = "selfsup: error: "


def _env(**extra) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _tiny(name: str, shards: Path, run_root: Path, **sections) -> dict:
    """tiny_config with a ResNet of width 8."""
    return tiny_config(name, shards, run_root, **{"model": {"width": 8}, **sections})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR)]


# --- one driver per run ---------------------------------------------------------------------------------------


def test_a_second_driver_is_refused_at_once_and_the_first_run_is_untouched(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [64, 64])  # 16 steps an epoch
    cfg = write_config(tmp_path / "first.yaml", _tiny("shared", shards, tmp_path / "runs", optim={"epochs": 15}))
    run = tmp_path / "runs" / "shared"
    first = subprocess.Popen(
        [SELFSUP, "pretrain", str(cfg), "--no-ray"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(run) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list_checkpoints(run) and first.poll() is None, "the first run wrote no checkpoint while running"
        held = json.loads((run / "lease.json").read_text())
        assert held["pid"] == first.pid and held["host"] == socket.gethostname()

        # the same name, another config; with --no-ray and under Ray (refused before Ray starts)
        for mode in (["--no-ray"], []):
            started = time.monotonic()
            second = subprocess.run(
                [SELFSUP, "pretrain", str(cfg), *mode, "seed=1", "optim.lr=0.8"],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            took = time.monotonic() - started
            assert second.returncode == 2 and took < 10, (took, second.stderr[-2000:])
            lines = _error_lines(second.stderr)
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert f"is in use by another driver (pid {first.pid} on {socket.gethostname()}" in lines[0]
            assert str(run) in lines[0]
        assert first.poll() is None  # the first was still running when the second was refused

        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert re.search(
        rf"^done: 240 steps, final weights in {re.escape(str(run))}/checkpoints/samples-000000001920,", out, re.M
    ), out
    # the folder holds the first run's config and weights only, and its metrics once
    for ckpt in list_checkpoints(run):
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())
        assert saved["seed"] == 3 and saved["optim"]["lr"] == 0.1
    assert [r["step"] for r in _records(run)] == list(range(1, 241))
    assert json.loads((run / "summary.json").read_text())["steps"] == 240
    assert not (run / "lease.json").exists()  # released at the end


# --- a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, kib)``: a tmpfs of ``kib`` KiB at ``tmp_path/name`` (remounted at that size when it is
    mounted already); skips the test where mounting is not allowed."""
    mounted = []

    def mount(name: str, kib: int) -> Path:
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        opts = ["-o", f"remount,size={kib}k"] if path in mounted else ["-t", "tmpfs", "-o", f"size={kib}k", "tmpfs"]
        done = subprocess.run(["mount", *opts, str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        if path not in mounted:
            mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _checkpoint_size(tmp_path: Path, shards: Path) -> int:
    """The bytes of one checkpoint of the tiny config (1 step, in this process)."""
    cfg = parse_config(_tiny("measure", shards, tmp_path / "measure", optim={"epochs": 1}))
    pretrain(cfg, use_ray=False)
    return checkpoint_bytes(latest_checkpoint(cfg.run_dir))


def _space_line(stderr: str, where: Path) -> tuple[float, float]:
    """The one error line of a full disk: it names ``where`` and the MiB needed and free."""
    lines = _error_lines(stderr)
    ours = "\n".join(line for line in stderr.splitlines() if "(TrainController pid=" not in line)  # Ray's own
    assert len(lines) == 1 and "Traceback" not in ours, stderr[-3000:]  # (it may log a cleanup timeout's)
    found = re.fullmatch(
        rf"{ERROR}not enough space for the next checkpoint in {re.escape(str(where))}: it needs "
        r"about (\d+) MiB, (\d+) MiB are free; .*",
        lines[0],
    )
    assert found, lines[0]
    return float(found.group(1)), float(found.group(2))


def test_a_full_disk_stops_with_one_line_and_the_rerun_cleans_up(tmp_path, tmpfs):
    size = _checkpoint_size(tmp_path, write_tiny_shards(tmp_path / "one-step", [8]))
    mib = size / 2**20
    shards = write_tiny_shards(tmp_path / "shards", [32, 32])  # 8 steps: checkpoints at steps 4 and 8
    disk = tmpfs("disk", int(1.9 * size / 1024))  # the first checkpoint fits, a second one (x1.25 margin) not
    cfg = write_config(tmp_path / "full.yaml", _tiny("full", shards, disk / "runs"))
    run = disk / "runs" / "full"

    failed = subprocess.run(
        [SELFSUP, "pretrain", str(cfg), "--no-ray"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    needed, free = _space_line(failed.stderr, run / "checkpoints")
    assert needed == pytest.approx(1.25 * mib, abs=1) and free < needed
    assert "basic_ios" not in failed.stderr and "iostream" not in failed.stderr
    good = latest_checkpoint(run)  # the last good checkpoint survives and loads
    assert good.name == "samples-000000000032" and not list((run / "checkpoints").glob(".tmp-*"))
    _, weights, state = load_checkpoint(good, with_state=True)
    assert state.step == 4 and weights

    # what a write killed mid-way leaves (0.8 checkpoint of bytes); free space, so a rerun fits only once
    # the leftover is gone
    leftover = run / "checkpoints" / ".tmp-samples-000000000064-99999"
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"\0" * int(0.8 * size))
    tmpfs("disk", int(2.6 * size / 1024))
    again = subprocess.run(
        [SELFSUP, "pretrain", str(cfg), "--no-ray"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    final = run / "checkpoints" / "samples-000000000064"
    assert f"done: 8 steps, final weights in {final}, 0 bad samples skipped" in again.stdout
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert load_checkpoint(final, with_state=True)[2].step == 8 and latest_checkpoint(run) == final


def test_a_full_disk_under_ray_spends_no_retry(tmp_path, tmpfs):
    size = _checkpoint_size(tmp_path, write_tiny_shards(tmp_path / "one-step", [8]))
    shards = write_tiny_shards(tmp_path / "shards", [32, 32])
    disk = tmpfs("disk", int(1.9 * size / 1024))
    cfg = write_config(
        tmp_path / "full.yaml", _tiny("full-ray", shards, disk / "runs", scaling={"num_workers": 1, "max_failures": 2})
    )
    run = disk / "runs" / "full-ray"
    failed = subprocess.run([SELFSUP, "pretrain", str(cfg)], env=_env(), capture_output=True, text=True, timeout=400)
    out = failed.stdout + failed.stderr
    assert failed.returncode == 2, out[-4000:]
    _space_line(failed.stderr, run / "checkpoints")
    # one attempt: a retry would resume from the step-4 checkpoint, and the worker's "resumed" line reaches
    # the driver (Ray's own lines, such as its failure policy's, only with -v)
    assert "resumed" not in out and "[FailurePolicy]" not in out, out[-4000:]
    assert latest_checkpoint(run).name == "samples-000000000032"
    assert load_checkpoint(latest_checkpoint(run), with_state=True)[2].step == 4
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "lease.json").exists()


# --- monotonic metrics ------------------------------------------------------------------------------------------


class CrashAtLog:
    """Reporter sink that raises when step ``at`` is logged (a process killed between checkpoints)."""

    def __init__(self, at: int):
        self.at = at

    def log(self, step, metrics):
        if step == self.at:
            raise Crash(f"injected at step {step}")


@pytest.mark.parametrize("crash_at", [7, 11])  # past the checkpoint of step 4; past the epoch's end (step 8)
def test_metrics_stay_monotonic_across_a_resume(tmp_path, crash_at):
    shards = write_tiny_shards(tmp_path / "shards", [32, 32])  # 8 steps an epoch
    cfg = parse_config(
        _tiny("mono", shards, tmp_path / "runs", optim={"epochs": 2}, train={"checkpoint_every_steps": 4})
    )
    with pytest.raises(Crash):
        train(cfg, CrashAtLog(crash_at))
    # logged up to the crash: the records past the checkpoint are of steps the resume redoes
    assert [r["step"] for r in _records(cfg.run_dir)] == list(range(1, crash_at + 1))
    assert latest_checkpoint(cfg.run_dir).name == f"samples-{8 * (crash_at // 4 * 4):012d}"
    summary = pretrain(cfg, use_ray=False)  # what `selfsup pretrain` runs again
    assert summary["steps"] == 16
    records = _records(cfg.run_dir)
    samples = [r["samples"] for r in records]
    assert all(a < b for a, b in zip(samples, samples[1:])), samples  # one line when plotted
    assert samples == [8 * s for s in range(1, 17)] and [r["step"] for r in records] == list(range(1, 17))


# --- local means local ------------------------------------------------------------------------------------------


def _jobs(dashboard: str, token: str) -> list[dict]:
    """Every job (submitted, or a driver that joined) the cluster at ``dashboard`` has seen."""
    request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_without_an_address_the_run_starts_its_own_ray(tmp_path):
    # Ray's auto-detection reads <RAY_TMPDIR>/ray/ray_current_cluster, which `ray start` writes: the other
    # program's cluster is the one a plain ray.init() would join
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(32)
    env = _env(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    shards = write_tiny_shards(tmp_path / "shards", [16, 16])
    cfg = write_config(tmp_path / "local.yaml", _tiny("local", shards, tmp_path / "runs"))
    try:
        with ray_head(env, num_cpus=1, temp_dir=ray_tmp / "ray") as (url, gcs, _):
            current = ray_tmp / "ray" / "ray_current_cluster"  # `ray start` writes it once its node is up
            for _ in range(120):
                if current.is_file() and current.read_text().strip():
                    break
                time.sleep(0.5)
            port = gcs.rsplit(":", 1)[1]
            assert current.read_text().strip().endswith(f":{port}")  # the node's own IP, the head's GCS port
            assert _jobs(url, token) == []
            done = subprocess.run([SELFSUP, "pretrain", str(cfg)], env=env, capture_output=True, text=True, timeout=400)
            out = done.stdout + done.stderr
            assert done.returncode == 0, out[-4000:]
            assert "starting a Ray of its own" in out and "done: 4 steps" in done.stdout
            assert _jobs(url, token) == []  # the other cluster saw no driver
            # control: in the same environment, Ray's own default does join that cluster
            joined = subprocess.run(
                [sys.executable, "-c", "import ray; ray.init(); print(ray.get_runtime_context().gcs_address)"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert joined.returncode == 0 and joined.stdout.strip().endswith(f":{port}"), joined.stderr[-2000:]
            assert len(_jobs(url, token)) == 1
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
