"""The console of `selfsup pretrain` under Ray shows selfsup's lines only: none of Ray's loggers, no
worker's output, no traceback, no escape code; on a quiet machine and beside another program's Ray,
where Ctrl-C is one line and exit code 130, and the resumed run's console goes on from where it resumed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.clusterkit import ray_head
from tests.helpers import tiny_config, write_config, write_tiny_shards
from tests.integration.test_ctrl_c import default_sigint

pytestmark = pytest.mark.integration

SELFSUP_LINE = re.compile(
    r"^(starting a Ray of its own on this machine|Ray dashboard: http://127\.0\.0\.1:\d+$|"
    r"resumed |pretraining \d+/\d+ steps|done: |selfsup: (error|note): )"
)


def selfsup(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "selfsup.cli", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        preexec_fn=default_sigint,
    )


def console_lines(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text and "\x1b" not in text and "\r" not in text, text
    assert [line for line in lines if not SELFSUP_LINE.match(line)] == [], text
    return lines


def test_a_run_under_ray_prints_only_selfsups_lines(tmp_path):
    config = write_config(
        tmp_path / "x.yaml", tiny_config("x", write_tiny_shards(tmp_path / "s", [40]), tmp_path / "runs")
    )
    run = selfsup(["pretrain", str(config)], tmp_path)
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 0, out
    lines = console_lines(out)
    assert len(lines) == 8, out  # starting Ray, its dashboard, a line each of the 5 steps (each a fifth), done
    assert [line.split(" steps")[0] for line in lines if line.startswith("pretraining")] == [
        f"pretraining {s}/5" for s in range(1, 6)
    ]
    logs = tmp_path / "runs" / "x" / "logs"
    assert "INFO ray." in (logs / "driver.log").read_text() and (logs / "ray").is_symlink()


DEMO_LINE = re.compile(
    r"^(\[[123]/3\] |set the old run aside as |starting a Ray of its own|Ray dashboard: |"
    r"pretraining \d+/\d+ steps|warning: (training|evaluating) with 1 of \d+ CPU threads|"
    r"online kNN@20 on a held-out subset must beat: |epoch \d+\.\d\d: online kNN@20 |"
    r"time budget |done: \d+ steps|.*: \d+ decoded images from the cache$|scoring \w+ \(|"
    r"baselines .* from the cache$|\| |\|---|report: |demo finished in |selfsup: note: )"
)


def test_the_demo_under_ray_prints_only_selfsups_lines(tmp_path):
    """`selfsup demo` on tiny shards (the same phases as on Fashion-MNIST): every line is one of selfsup's."""
    write_tiny_shards(tmp_path / "data" / "train", [400])
    write_tiny_shards(tmp_path / "data" / "test", [200], seed=1, split="test")
    run = selfsup(
        [
            "demo",
            "--data",
            str(tmp_path / "data"),
            "data.batch_size=32",
            "optim.epochs=3",
            "model.width=4",
            "tracking.mode=disabled",
        ],
        tmp_path,
    )
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert "Traceback" not in out and "\x1b" not in out and "\r" not in out, out
    assert [line for line in lines if not DEMO_LINE.match(line)] == [], out
    print(f"the demo on tiny shards printed {len(lines)} lines")
    assert sum(line.startswith("pretraining ") for line in lines) >= 3 and lines[-1].startswith("demo finished in")


def test_beside_another_ray_ctrl_c_is_one_line_and_the_resumed_console_goes_on_from_there(tmp_path):
    # 25 steps an epoch, 4 epochs, a checkpoint every 10 steps and each epoch (each waits on Ray's controller)
    config = write_config(
        tmp_path / "x.yaml",
        tiny_config(
            "x",
            write_tiny_shards(tmp_path / "s", [200]),
            tmp_path / "runs",
            optim={"epochs": 4},
            train={"checkpoint_every_steps": 10},
        ),
    )
    with ray_head(dict(os.environ)):
        run = selfsup(["pretrain", str(config)], tmp_path)
        seen = []
        for line in run.stdout:  # Ctrl-C once a few checkpoints are written
            seen.append(line)
            if line.startswith("pretraining 30/100"):
                break
        run.send_signal(signal.SIGINT)
        out = "".join(seen) + run.communicate(timeout=300)[0]
        assert run.returncode == 130, out
        lines = console_lines(out)
        stopped = re.fullmatch(
            rf"selfsup: error: interrupted; the last checkpoint is {tmp_path}/runs/x/checkpoints/"
            rf"samples-\d+ \(step (\d+)\); resume with: selfsup pretrain {config}",
            lines[-1],
        )
        assert stopped, lines[-1]
        started = time.perf_counter()
        again = selfsup(["pretrain", str(config)], tmp_path)
        out = again.communicate(timeout=600)[0]
        print(f"the resumed run took {time.perf_counter() - started:.0f} s")
        assert again.returncode == 0, out
        lines = console_lines(out)
        resumed = int(re.search(r"^resumed x from .* \(step (\d+)\)$", out, re.M).group(1))
        assert resumed >= int(stopped.group(1)) - 5  # the last checkpoint, or the one Ray took before it
        first = next(line for line in lines if line.startswith("pretraining"))
        assert int(first.split()[1].split("/")[0]) > resumed, out  # no line of the earlier attempt again
        assert lines[-1].startswith("done: 100 steps")
