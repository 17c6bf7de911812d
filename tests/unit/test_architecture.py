"""The import contracts of pyproject.toml ([tool.importlinter]): layers, no cycles, torch-free config,
Ray only in cluster, wandb only in tracking, argparse only in cli."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "6 kept, 0 broken" in done.stdout


def test_one_place_builds_a_trainer_and_one_door_trains():
    """Outside the tests, a ``Trainer`` is made only by ``cluster.in_process.build_trainer`` (which the one
    door, ``cluster.driver.pretrain``, reaches), and the seven old names for "train" are gone."""
    import re

    sources = {p: p.read_text() for folder in ("selfsup", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    made = re.compile(r"(?<![`\w])Trainer\(")  # a call, not ``Trainer(...)`` in a docstring
    builds = sorted(str(p.relative_to(ROOT)) for p, text in sources.items() if made.search(text))
    assert builds == ["selfsup/cluster/in_process.py"], builds
    old = re.compile(
        r"\b(run_pretraining|run_training|pretrain_here|_fit_under_ray|_train_worker|under_ray)\b"
        r"|\bdrive\("
    )
    assert not [str(p.relative_to(ROOT)) for p, text in sources.items() if old.search(text)]
