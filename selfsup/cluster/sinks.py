"""Where a run reports, besides its own files: its bucket and Ray Train (sinks of the Trainer's reporter).

:func:`run_sinks` is the sinks every run has (its files, its bucket, W&B); the Ray driver adds
:class:`RayReporter`, and whoever shows the progress adds a ``ProgressConsole``.
"""

from __future__ import annotations

from pathlib import Path

from selfsup.config import ExperimentConfig
from selfsup.core.checkpoint import prune_checkpoints
from selfsup.core.distributed import rank, world_size
from selfsup.core.fence import LeaseLost, fenced
from selfsup.core.reporter import FileReporter
from selfsup.tracking.wandb_run import WandbReporter
from selfsup.train.lease import Fence


class RayReporter:
    """Sink (every rank): each checkpoint, with the last record, goes to ``ray.train.report``, so Ray's
    result and checkpoint storage see it. Every rank reports the same number of times; rank 0 passes
    the checkpoint directory, the others none. Rank 0 reports under ``fence`` (Ray's worker copies the
    checkpoint into the run folder within the call), then prunes to ``keep`` by write order. For a run
    in a bucket it first pushes the run's metrics there, so that rank 0 on another node resumes them.

    Plain records are not reported: a report waits until Ray's controller has taken the one before
    (it polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), which would cap the steps per second.
    After each checkpoint a second report waits for exactly that, so the loop trains on only once Ray
    holds the checkpoint: a node lost at any later step resumes from it (at most one interval lost)."""

    def __init__(self, cfg: ExperimentConfig, fence: Fence | None):
        self.cfg, self.fence = cfg, fence

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None:
        import ray.train

        record = {"step": step, **metrics}
        if path is None:
            ray.train.report(record, checkpoint=None)
        else:  # into <storage_path>/<name>/checkpoints/<its name>: the run folder's layout
            if self.cfg.run_url:  # the records up to this checkpoint are in the bucket before it is
                from selfsup.core.storage import push_run_files

                with fenced(self.fence):
                    push_run_files(self.cfg.run_dir, self.cfg.run_url)
            try:
                with fenced(self.fence):
                    ray.train.report(
                        record,
                        checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                        checkpoint_dir_name=f"checkpoints/{path.name}",
                    )
            except LeaseLost:
                if world_size() == 1:
                    raise
                ray.train.report(record)  # refused; the other ranks wait for this report, and every rank
                ray.train.report(record)  # stops at the next lease check (Trainer._check_lease)
                return
            self._prune()
        ray.train.report(record)  # returns once the controller has taken the checkpoint's report

    def _prune(self) -> None:
        """Keep the ``train.keep_checkpoints`` written last, in the run folder or its bucket."""
        if not self.cfg.run_url:
            prune_checkpoints(self.cfg.run_dir, self.cfg.train.keep_checkpoints, self.fence)
            return
        from selfsup.core.storage import delete_checkpoint, remote_checkpoints

        with fenced(self.fence):
            for old in remote_checkpoints(self.cfg.run_url)[: -self.cfg.train.keep_checkpoints]:
                delete_checkpoint(self.cfg.run_url, old)


class RunSyncReporter:
    """Sink (rank 0): pushes the run's metrics and summary to its bucket (``run_root: s3://…``) when
    the run finishes (each checkpoint pushes them too: the checkpoint writer, or :class:`RayReporter`)."""

    def __init__(self, run_dir: Path, run_url: str, fence: Fence | None):
        self.run_dir, self.run_url, self.fence = run_dir, run_url, fence

    def finish(self, summary: dict) -> None:
        from selfsup.core.storage import push_run_files

        if rank() == 0:
            with fenced(self.fence):
                push_run_files(self.run_dir, self.run_url)


def run_sinks(cfg: ExperimentConfig, fence: Fence | None = None) -> list[object]:
    """The sinks of every run, writing under ``fence``: its files; its bucket when remote (whose run files,
    the W&B id and metrics of an earlier attempt, are pulled first); W&B on rank 0 unless disabled."""
    sinks: list[object] = [FileReporter(cfg.run_dir, fence)]
    if cfg.run_url:
        from selfsup.core.storage import pull_run_files

        if rank() == 0:
            pull_run_files(cfg.run_url, cfg.run_dir)
        sinks.append(RunSyncReporter(cfg.run_dir, cfg.run_url, fence))
    if rank() == 0 and cfg.tracking.mode != "disabled":
        sinks.append(WandbReporter(cfg))
    return sinks
