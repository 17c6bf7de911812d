"""The in-process driver: one rank's training of a run in this process (``--no-ray``, or a Ray worker).

:func:`train_here` resumes where :func:`~selfsup.core.checkpoint.decide_resume` says and trains to the
end of the plan; :func:`build_trainer` is the one place a ``Trainer`` is made (benchmarks that time its
``step`` use it too). Only :func:`selfsup.cluster.driver.pretrain` and the Ray driver call these.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from selfsup.cluster.sinks import run_sinks
from selfsup.config import ExperimentConfig
from selfsup.core.checkpoint import decide_resume
from selfsup.core.distributed import rank
from selfsup.core.reporter import Reporter, Reporters, truncate_records
from selfsup.train.lease import Fence
from selfsup.train.trainer import Trainer

log = logging.getLogger("selfsup.cluster")


def build_trainer(
    cfg: ExperimentConfig,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    staging: Path | None = None,
    fence: Fence | None = None,
) -> Trainer:
    """A ``Trainer`` of ``cfg`` on this rank (no reporter: its steps report nothing)."""
    return Trainer(cfg, reporter or Reporters(), resume_from, staging, fence)


def train_here(
    cfg: ExperimentConfig, sinks: Sequence[object] = (), fence: Fence | None = None, staging: Path | None = None
) -> dict:
    """Train ``cfg`` on this rank from the run's latest good checkpoint if it has one, reporting to the
    run's sinks and ``sinks``, every write under ``fence`` (checkpoints into ``staging`` when given, for
    Ray to persist); returns the summary. Records past the checkpoint's position (all, starting afresh)
    are dropped from ``metrics.jsonl`` first, so that it reads as one run."""
    reporter = Reporters(*run_sinks(cfg, fence), *sinks)  # a remote run's metrics are pulled first
    resume = decide_resume(cfg.run_dir, cfg.run_url, fence)
    if rank() == 0:
        log.debug("%s: %s", cfg.name, resume.reason)
        truncate_records(cfg.run_dir / "metrics.jsonl", resume.samples_seen, fence)
    trainer = build_trainer(cfg, reporter, resume.checkpoint, staging, fence)
    reporter.start()  # W&B starts only now, once the Trainer has checked the config, data and checkpoint
    return trainer.fit()
