"""Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) during `shards write`'s
pool of image checkers: one line and exit code 130, no worker's traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def default_sigint() -> None:
    """In the child: SIGINT as a terminal's shell leaves it (a test runner started in the background
    may ignore it, and a child inherits that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_pool_of_workers_is_one_line(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(tmp_path / "photos" / "a" / f"{i}.png")
    os.mkfifo(tmp_path / "photos" / "a" / "z-fifo.png")  # reading it blocks: the write can never finish first
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "selfsup.cli",
            "shards",
            "write",
            "image-folder",
            str(tmp_path / "photos"),
            str(tmp_path / "out"),
            "--processes",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    seen = [run.stdout.readline()]  # the progress line at 0%: the pool is at work
    os.killpg(run.pid, signal.SIGINT)
    out = "".join(seen) + run.communicate(timeout=120)[0]
    assert run.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert [line for line in out.splitlines() if line.startswith("selfsup:")] == ["selfsup: error: interrupted"]
