"""Fault-tolerance figures: worker and driver kills, uneven/empty shares, corrupt data.

    python -m benchmarks.faults                 # all scenarios; worker kill 5 times
    python -m benchmarks.faults worker --repeats 5
    python -m benchmarks.faults driver | uneven | corrupt

Each scenario runs ``selfsup pretrain`` (under a local Ray unless noted) on tiny shards in a temp
directory and prints one line of facts per run. Only processes this script started are signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from selfsup.core.checkpoint import checkpoint_step, list_checkpoints

SELFSUP = [sys.executable, "-m", "selfsup.cli"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp: Path, name: str, shards: Path, **sections) -> Path:
    """A config file for a 2-worker CPU SimCLR run small enough for two cores."""
    tree = {
        "name": name,
        "run_root": str(tmp / "runs"),
        "seed": 5,
        "data": {"train": str(shards), "batch_size": 8, "loader_workers": 0, "shuffle_buffer": 16},
        "model": {"width": 4},
        "method": {"name": "simclr"},
        "optim": {"lr": 0.1, "epochs": 2, "warmup_epochs": 0.2},
        "train": {"log_every_steps": 1, "checkpoint_every_steps": 3, "threads": 1},
        "scaling": {"num_workers": 2, "max_failures": 2},
        "tracking": {"mode": "disabled"},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def make_shards(out: Path, sizes: list[int], seed: int = 0) -> Path:
    from tests.helpers import write_tiny_shards

    return write_tiny_shards(out, sizes, seed)


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def train_workers(root_pid: int) -> list[int]:
    """PIDs of the Ray Train worker processes descended from ``root_pid``."""
    kids, todo, found = _children(), [root_pid], []
    while todo:
        pid = todo.pop()
        for c in kids.get(pid, []):
            todo.append(c)
            try:
                if b"RayTrainWorker" in Path(f"/proc/{c}/cmdline").read_bytes():
                    found.append(c)
            except OSError:
                pass
    return sorted(found)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _checkpoints(run_dir: Path) -> list[str]:
    """Names of the run's complete checkpoints, in the order they were written."""
    return [p.name for p in list_checkpoints(run_dir)]


def _samples(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["samples"] for line in path.read_text().splitlines() if line.strip()]


class StepWatch:
    """Follows ``metrics.jsonl`` while a run goes. A resume rewrites the file without the records past
    its checkpoint (a new inode), so the highest step logged before each resume is kept here."""

    def __init__(self, run_dir: Path):
        self.path, self.run_dir = run_dir / "metrics.jsonl", run_dir
        self.inode, self.peak, self.peaks = None, 0, []

    def poll(self) -> int:
        """The last step logged now (0 before the first)."""
        try:
            inode = self.path.stat().st_ino
            steps = _steps(self.run_dir)
        except (OSError, ValueError):  # between a rewrite's steps, or a line half written
            return self.peak
        if self.inode is not None and inode != self.inode:
            self.peaks.append(self.peak)
            self.peak = 0
        self.inode, self.peak = inode, max(self.peak, *steps, 0)
        return steps[-1] if steps else 0


def resumed_steps(output: str) -> list[int]:
    """The step of each ``resumed ... (step N)`` line the loop logged."""
    return [int(m) for m in re.findall(r"resumed \S+ from \S+ \(step (\d+)\)", output)]


def resumed_by_rank(run_dir: Path) -> dict[int, list[int]]:
    """Each Ray Train worker's ``resumed`` steps by its rank, from Ray's worker logs (the console shows
    rank 0's selfsup lines only; Ray's JSON log of every worker, linked under ``<run>/logs/ray``, has all)."""
    steps: dict[int, list[int]] = {}
    for path in sorted((run_dir / "logs" / "ray" / "train").glob("ray-train-app-worker-*.log")):
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            for step in resumed_steps(record.get("message", "")):
                steps.setdefault(record["world_rank"], []).append(step)
    return dict(sorted(steps.items()))


def worker_failure(tmp: Path, rng: random.Random, timeout: float = 400) -> dict:
    """2 workers; SIGKILL one Ray Train worker at a random step; Ray restarts the group, the loop resumes.
    ``restarts``: (the highest step logged before a restart, the step it resumed from)."""
    shards = make_shards(tmp / "shards", [40, 56, 32])
    cfg = tiny_run(tmp, "worker-kill", shards)
    run_dir = tmp / "runs" / "worker-kill"
    total = 2 * ((40 + 56 + 32) // 8 // 2)
    kill_at = rng.randint(2, total - 2)
    proc = subprocess.Popen(
        [*SELFSUP, "pretrain", str(cfg)],
        cwd=tmp,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed, deadline, watch = None, time.monotonic() + timeout, StepWatch(run_dir)
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            last = watch.poll()
            if killed is None and last >= kill_at:
                workers = train_workers(proc.pid)
                if workers:
                    victim = rng.choice(workers)
                    os.kill(victim, signal.SIGKILL)
                    killed = (last, victim, len(workers))
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    resumed = resumed_steps(out)  # rank 0's, the one the console shows
    restarts = list(zip(watch.peaks, resumed))
    samples = _samples(run_dir)
    return {
        "rc": proc.returncode,
        "killed_at_step": killed and killed[0],
        "planned": total,
        "final_steps": summary.get("steps"),
        "restarts": restarts,
        "resumes_by_rank": resumed_by_rank(run_dir),
        "lost_steps": [a - b for a, b in restarts],
        "interval": 3,
        "steps_logged": _steps(run_dir),
        "samples_increasing": all(a < b for a, b in zip(samples, samples[1:])),
        "final_checkpoint": summary.get("checkpoint"),
        "checkpoints": _checkpoints(run_dir),
        "tail": out[-2000:] if proc.returncode else "",
    }


def driver_failure(tmp: Path, rng: random.Random, timeout: float = 400) -> dict:
    """SIGKILL the driver (and the local Ray it started) mid-run; the same command again resumes."""
    shards = make_shards(tmp / "shards", [40, 56, 32])
    cfg = tiny_run(tmp, "driver-kill", shards, scaling={"max_failures": 0})
    run_dir = tmp / "runs" / "driver-kill"
    total = 2 * ((40 + 56 + 32) // 8 // 2)
    kill_at = rng.randint(4, total - 2)
    proc = subprocess.Popen(
        [*SELFSUP, "pretrain", str(cfg)],
        cwd=tmp,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (_steps(run_dir) or [0])[-1] >= kill_at:
            break
        time.sleep(0.2)
    killed_at = (_steps(run_dir) or [0])[-1]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver's whole session: the driver and its local Ray
    proc.wait()
    before = _checkpoints(run_dir)
    before_steps = [checkpoint_step(run_dir / "checkpoints" / name) for name in before]
    again = subprocess.run(
        [*SELFSUP, "pretrain", str(cfg)],
        cwd=tmp,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=max(1.0, deadline - time.monotonic()),
    )
    summary = json.loads((run_dir / "summary.json").read_text()) if again.returncode == 0 else {}
    resumed = [line for line in (again.stdout + again.stderr).splitlines() if "resumed" in line]
    samples = _samples(run_dir)
    return {
        "rc": again.returncode,
        "killed_at_step": killed_at,
        "checkpoints_at_kill": before,
        "checkpoint_steps_at_kill": before_steps,
        "resumed": resumed[:1],
        "final_steps": summary.get("steps"),
        "lease_taken_over": "taking over the stale lease" in again.stderr,
        "planned": total,
        "final_checkpoint": summary.get("checkpoint"),
        "checkpoints": _checkpoints(run_dir),
        "samples_increasing": all(a < b for a, b in zip(samples, samples[1:])),
        "tail": (again.stdout + again.stderr)[-2000:] if again.returncode else "",
    }


def uneven(tmp: Path, timeout: float = 300) -> dict:
    """2 workers, two shards of 40 where one is a zero-byte file: a rank's whole share is unreadable."""
    shards = make_shards(tmp / "shards", [40, 40])
    (shards / "train1-000000.tar").write_bytes(b"")
    cfg = tiny_run(tmp, "uneven", shards, optim={"epochs": 1}, scaling={"max_failures": 0})
    try:
        done = subprocess.run(
            [*SELFSUP, "pretrain", str(cfg)], cwd=tmp, env=_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"rc": None, "hung": True}
    summary = json.loads((tmp / "runs" / "uneven" / "summary.json").read_text()) if done.returncode == 0 else {}
    return {
        "rc": done.returncode,
        "hung": False,
        "final_steps": summary.get("steps"),
        "planned": 5,
        "skipped": summary.get("data", {}).get("skipped"),
        "tail": done.stdout[-1500:] if done.returncode else "",
    }


def write_corrupt_shards(out: Path) -> tuple[Path, dict]:
    """200 samples in 6 shards, 10 of them (5%) corrupt: 3 bad PNG payloads, the last 3 members of one
    shard truncated away, and a zero-byte shard of 4; returns (folder, what was corrupted)."""
    from selfsup.data.shards import write_shards
    from selfsup.data.sources import encode_png
    from tests.helpers import make_images

    sizes = [40, 40, 40, 40, 36, 4]
    images, labels = make_images(sum(sizes), seed=1)
    bad_png = {5, 47, 101}
    samples = [
        {
            "__key__": f"s{i:05d}",
            "png": b"\x89PNG\r\n\x1a\nnot really" if i in bad_png else encode_png(images[i]),
            "cls": int(labels[i]),
        }
        for i in range(sum(sizes))
    ]
    manifest = write_shards(iter(samples), out, split="train", classes=list("abcd"), samples_per_shard=40)
    # split the 40-sample tail shard written last into 36 + 4 by re-writing the last two by hand
    assert [s["count"] for s in manifest["shards"]] == [40, 40, 40, 40, 40]
    last = manifest["shards"].pop()
    (out / last["name"]).unlink()
    for name, chunk in (("train-000004.tar", samples[160:196]), ("train-000005.tar", samples[196:200])):
        m = write_shards(iter(chunk), out / "tmp", split="x", samples_per_shard=100)
        (out / "tmp" / m["shards"][0]["name"]).rename(out / name)
        manifest["shards"].append({**m["shards"][0], "name": name})
    (out / "tmp" / "manifest.json").unlink()
    (out / "tmp").rmdir()
    # truncate train-000004.tar inside the member of its 34th sample: samples 33..35 of it are lost
    path = out / "train-000004.tar"
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name.startswith("s00193"))
    path.write_bytes(path.read_bytes()[: member.offset_data + 10])
    (out / "train-000005.tar").write_bytes(b"")
    manifest["num_samples"] = 200
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, {"bad_png": 3, "truncated": 3, "zero_byte": 4, "total": 10}


def corrupt(tmp: Path, timeout: float = 300) -> dict:
    """1 rank, no Ray: 5% corrupt samples; every good sample trains once, the bad ones are counted."""
    shards, bad = write_corrupt_shards(tmp / "shards")
    cfg = tiny_run(tmp, "corrupt", shards, optim={"epochs": 1}, scaling={"num_workers": 1, "max_failures": 0})
    done = subprocess.run(
        [*SELFSUP, "pretrain", "--no-ray", str(cfg)],
        cwd=tmp,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    summary = json.loads((tmp / "runs" / "corrupt" / "summary.json").read_text()) if done.returncode == 0 else {}
    data = summary.get("data", {})
    return {
        "rc": done.returncode,
        "final_steps": summary.get("steps"),
        "planned": 200 // 8,
        "corrupted": bad,
        "skipped": data.get("skipped"),
        "repeated": data.get("repeated"),
        "where": data.get("where"),
        "printed": [line for line in done.stdout.splitlines() if line.startswith("done:")],
        "tail": done.stderr[-1500:] if done.returncode else "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", nargs="?", default="all", choices=["all", "worker", "driver", "uneven", "corrupt"])
    p.add_argument("--repeats", type=int, default=5, help="worker kills")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    if args.scenario in ("all", "worker"):
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                r = worker_failure(Path(tmp), rng)
            ok = r["rc"] == 0 and r["final_steps"] == r["planned"] and all(x <= r["interval"] for x in r["lost_steps"])
            print(
                f"worker kill {i + 1}/{args.repeats}: killed at step {r['killed_at_step']}, restarts (last logged, "
                f"resumed from) {r['restarts']}, lost {r['lost_steps']} steps (interval {r['interval']}), final "
                f"{r['final_steps']}/{r['planned']} steps, rc {r['rc']} -> {'OK' if ok else 'FAIL'}{r['tail']}",
                flush=True,
            )
    if args.scenario in ("all", "driver"):
        with tempfile.TemporaryDirectory() as tmp:
            r = driver_failure(Path(tmp), rng)
        ok = r["rc"] == 0 and r["final_steps"] == r["planned"] and r["resumed"]
        print(
            f"driver kill: killed at step {r['killed_at_step']} with {r['checkpoints_at_kill']}; re-run: "
            f"{r['resumed']}, final {r['final_steps']}/{r['planned']} steps, rc {r['rc']} -> "
            f"{'OK' if ok else 'FAIL'}{r['tail']}",
            flush=True,
        )
    if args.scenario in ("all", "uneven"):
        with tempfile.TemporaryDirectory() as tmp:
            r = uneven(Path(tmp))
        ok = r["rc"] == 0 and r["final_steps"] == r["planned"]
        print(
            f"uneven shards, one rank's share a zero-byte shard: hung={r['hung']}, final "
            f"{r.get('final_steps')}/{r.get('planned')} steps, {r.get('skipped')} skipped, rc {r['rc']} -> "
            f"{'OK' if ok else 'FAIL'}{r.get('tail', '')}",
            flush=True,
        )
    if args.scenario in ("all", "corrupt"):
        with tempfile.TemporaryDirectory() as tmp:
            r = corrupt(Path(tmp))
        ok = r["rc"] == 0 and r["final_steps"] == r["planned"] and r["skipped"] == r["corrupted"]["total"]
        print(
            f"corrupt data ({r['corrupted']}): final {r['final_steps']}/{r['planned']} steps, skipped "
            f"{r['skipped']}, topped up {r['repeated']}, printed {r['printed']} -> {'OK' if ok else 'FAIL'}"
            f"{r['tail']}",
            flush=True,
        )
        for w in r["where"] or []:
            print(f"  skipped: {w}")


if __name__ == "__main__":
    main()
