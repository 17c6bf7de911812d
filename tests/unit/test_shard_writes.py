"""`shards write` that does not finish: a re-write killed halfway and a disk that fills leave a folder that
every reader refuses in one line (never the old manifest beside new tars), and the next write makes it whole;
a killed writer leaves no decoding worker behind."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.data.reader import MANIFEST, PARTIAL, read_manifest
from selfsup.data.shards import verify_shards
from tests.helpers import make_images, tiny_config, write_config, write_idx

ROOT = Path(__file__).resolve().parents[2]
FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk; works as root too

KILLED_WRITER = """
import sys, time, pathlib
import numpy as np
from selfsup.data.shards import write_shards
from selfsup.data.sources import encode_png

def samples():
    for i in range(30):
        if i == 15:  # a shard and a half written: tell the test, then wait for its SIGKILL
            pathlib.Path(sys.argv[2]).write_text("15")
            time.sleep(600)
        yield {"__key__": f"new-{i:03d}", "png": encode_png(np.full((8, 8), i, np.uint8)), "cls": 0}

write_shards(samples(), sys.argv[1], samples_per_shard=10)
"""


POOL_OWNER = """
import multiprocessing, pathlib, sys, threading, time
from selfsup.data.sources import _pooled

threading.Thread(target=lambda: list(_pooled(time.sleep, [600, 600], 2, 1)), daemon=True).start()
while len(multiprocessing.active_children()) < 2:
    time.sleep(0.05)
pathlib.Path(sys.argv[1]).write_text(" ".join(str(p.pid) for p in multiprocessing.active_children()))
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_decoding_pool_ends_with_a_sigkilled_writer(tmp_path):
    pids_file = tmp_path / "pids"
    owner = subprocess.Popen(
        [sys.executable, "-c", POOL_OWNER, str(pids_file)], env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        deadline = time.monotonic() + 60
        while not pids_file.exists() and owner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert owner.poll() is None and pids_file.exists(), "the pool never started"
        workers = [int(p) for p in pids_file.read_text().split()]
        assert len(workers) == 2 and all(_running(p) for p in workers)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in workers), "a worker of the killed writer is still decoding"


def _write_idx(tmp_path: Path, out: Path, n: int, prefix: str) -> int:
    images, labels = make_images(n, seed=n)
    img = write_idx(tmp_path / f"{prefix}-imgs-idx3-ubyte", images)
    lab = write_idx(tmp_path / f"{prefix}-labs-idx1-ubyte", labels)
    return main(["shards", "write", "idx", str(img), str(lab), str(out), "--per-shard", "10"])


def _keys(tar: Path) -> set[str]:
    with tarfile.open(tar) as t:
        return {m.name.split(".")[0] for m in t.getmembers()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("selfsup: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _refused_everywhere(out: Path, tmp_path: Path, capsys) -> None:
    """verify, index and pretrain each refuse ``out`` in one line that calls it partial."""
    for argv in (["shards", "verify", str(out)], ["shards", "index", str(out)]):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert f"{out} holds a partial `selfsup shards write`" in line and "do not index it" in line, line
    config = write_config(tmp_path / "x.yaml", tiny_config("x", out, tmp_path / "runs"))
    assert main(["pretrain", str(config), "--no-ray"]) == 2
    assert "holds a partial `selfsup shards write`" in _one_error_line(capsys)


def test_a_killed_rewrite_is_refused_in_one_line_and_the_next_write_makes_it_whole(tmp_path, capsys):
    out = tmp_path / "out"
    assert _write_idx(tmp_path, out, 30, "old") == 0  # the old data set: 3 shards of 10
    old = _keys(out / "train-000002.tar")
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out), str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not ready.exists() and writer.poll() is None:
            time.sleep(0.05)
        assert writer.poll() is None, "the writer ended before it was killed"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    # the mix the kill left: a new first shard beside an old third one, and no manifest to trust
    assert _keys(out / "train-000000.tar") == {f"new-{i:03d}" for i in range(10)}
    assert _keys(out / "train-000002.tar") == old
    assert not (out / MANIFEST).exists() and (out / PARTIAL).exists()
    _refused_everywhere(out, tmp_path, capsys)

    assert _write_idx(tmp_path, out, 12, "next") == 0  # the next command: 2 shards, the old third one removed
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "train-000000.tar", "train-000001.tar"]
    report = verify_shards(str(out))
    assert report.ok and report.samples == 12


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_saying_the_output_is_partial(tmp_path, capsys, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    out = tmp_path / "out"
    assert _write_idx(tmp_path, out, 30, "old") == 0
    capsys.readouterr()
    (out / "train-000001.tar").unlink()
    (out / "train-000001.tar").symlink_to(FULL)  # the disk fills at the second shard: a real ENOSPC
    assert _write_idx(tmp_path, out, 25, "new") == 2
    line = _one_error_line(capsys)
    assert line == (
        f"selfsup: error: {out}: out of space (No space left on device); the output is partial "
        f"({PARTIAL} marks it) and must be re-written, not indexed: free space or pass another OUT, "
        "then run `selfsup shards write` again"
    )
    assert not (out / MANIFEST).exists()
    gc.collect()
    assert unraisable == []  # the failed tar's buffer is dropped, not written again at exit with a traceback
    _refused_everywhere(out, tmp_path, capsys)

    (out / "train-000001.tar").unlink()  # space freed: the next write works
    assert _write_idx(tmp_path, out, 25, "new") == 0
    assert read_manifest(str(out))[0]["num_samples"] == 25 and verify_shards(str(out)).ok
    assert not (out / PARTIAL).exists()


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_a_disk_too_full_to_begin_changes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert _write_idx(tmp_path, out, 30, "old") == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / PARTIAL).symlink_to(FULL)  # not even the partial mark fits
    assert _write_idx(tmp_path, out, 25, "new") == 2
    assert "cannot begin writing (No space left on device); nothing in it was changed" in _one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert verify_shards(str(out)).samples == 30
