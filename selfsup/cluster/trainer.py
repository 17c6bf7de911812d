"""Ray Train: runs the ``Trainer`` in a ``TorchTrainer``, one process per GPU (or CPU slot);
``pretrain_here`` runs the same Trainer in this process (``--no-ray``). Both report to the run's
sinks: its files, W&B, its bucket, and Ray under Ray.

Without ``address`` or ``RAY_ADDRESS`` it starts a Ray of its own on this machine (never one that
another program started: ``--address auto`` joins that); with them the same call runs on that
cluster. Ray's token authentication stays on (``RAY_AUTH_MODE=token`` unless set).

Under Ray, checkpoints go to Ray's checkpoint storage, ``RunConfig(storage_path=run_root)``: the run
folder locally, a bucket (or NFS) for several nodes. A restarted worker group resumes from
``ray.train.get_checkpoint()`` on whatever node rank 0 lands. Errors that a retry cannot heal (no
space for a checkpoint, bad config, missing data) end the run without spending ``max_failures``.
One driver per run folder: :func:`run_training` holds the run's lease.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from selfsup.config import ConfigError, ExperimentConfig
from selfsup.core.checkpoint import CheckpointSpaceError, latest_checkpoint, read_progress, remove_after
from selfsup.core.distributed import rank
from selfsup.core.reporter import FileReporter, Reporters, truncate_records
from selfsup.data.reader import ManifestError
from selfsup.tracking.wandb_run import WandbReporter, start_run
from selfsup.train.lease import run_lease
from selfsup.train.trainer import Trainer

FATAL = (CheckpointSpaceError, ConfigError, ManifestError, FileNotFoundError)  # a retry cannot heal these


class RunFailed(RuntimeError):
    """The run stopped on an error that retrying cannot heal; the message says what to do."""


log = logging.getLogger("selfsup.cluster")


class RayReporter:
    """Sink (every rank): each checkpoint, with the last record, goes to ``ray.train.report``, so Ray's
    result and checkpoint storage see it. Every rank reports the same number of times; rank 0 passes
    the checkpoint directory, the others none.

    Plain records are not reported: a report waits until Ray's controller has taken the one before
    (it polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), which would cap the steps per second.
    After each checkpoint a second report waits for exactly that, so the loop trains on only once Ray
    holds the checkpoint: a node lost at any later step resumes from it (at most one interval lost)."""

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None:
        import ray.train

        record = {"step": step, **metrics}
        if path is None:
            ray.train.report(record, checkpoint=None)
        else:  # into <storage_path>/<name>/checkpoints/<its name>: the run folder's layout
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                             checkpoint_dir_name=f"checkpoints/{path.name}")
        ray.train.report(record)  # returns once the controller has taken the checkpoint's report


class RunSyncReporter:
    """Sink (rank 0): pushes the run's metrics and summary to its bucket (``run_root: s3://…``) when
    the run finishes, and under Ray its metrics with each checkpoint (without Ray, ``save_checkpoint``
    does that), so that rank 0 on another node resumes them."""

    def __init__(self, cfg: ExperimentConfig, under_ray: bool):
        self.cfg, self.under_ray = cfg, under_ray

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None:
        from selfsup.core.storage import push_run_files

        if self.under_ray and path is not None:
            push_run_files(self.cfg.run_dir, self.cfg.run_url)

    def finish(self, summary: dict) -> None:
        from selfsup.core.storage import push_run_files

        if rank() == 0:
            push_run_files(self.cfg.run_dir, self.cfg.run_url)


def run_reporters(cfg: ExperimentConfig, under_ray: bool) -> Reporters:
    """The run's sinks: its files; its bucket when remote (whose run files, the W&B id and metrics
    of an earlier attempt, are pulled first); Ray under Ray; W&B on rank 0 unless disabled."""
    sinks: list[object] = [FileReporter(cfg.run_dir)]
    if cfg.run_url:
        from selfsup.core.storage import pull_run_files

        if rank() == 0:
            pull_run_files(cfg.run_url, cfg.run_dir)
        sinks.append(RunSyncReporter(cfg, under_ray))
    if under_ray:
        sinks.append(RayReporter())
    if rank() == 0 and (run := start_run(cfg.run_dir, cfg.name, cfg.tracking.mode, cfg.tracking.project,
                                         cfg.tracking.entity, cfg.model_dump(mode="json"), job_type="pretrain")):
        sinks.append(WandbReporter(run))
    return Reporters(*sinks)


def pretrain_here(cfg: ExperimentConfig, under_ray: bool = False, resume_from: Path | None = None,
                  staging: Path | None = None) -> dict:
    """Train ``cfg`` in this process (``--no-ray``, or one Ray worker) from ``resume_from``, else from
    the run's latest checkpoint if it has one; returns the summary. Records past the checkpoint's
    position (all, starting afresh) are dropped from ``metrics.jsonl``, so it reads as one run."""
    resume_from = resume_from or latest_checkpoint(cfg.run_dir, remote=cfg.run_url)
    reporter = run_reporters(cfg, under_ray)  # a remote run's metrics are pulled first
    if rank() == 0:
        position = read_progress(resume_from)["samples_seen"] if resume_from is not None else 0
        truncate_records(cfg.run_dir / "metrics.jsonl", position)
    return Trainer(cfg, reporter, resume_from, staging).fit()


def _train_worker(config: dict) -> str | None:
    """Entry point of each Ray Train worker: resume from Ray's checkpoint storage, or the run folder.
    Returns the message of an error that a retry cannot heal (Ray hands rank 0's to the driver), else None."""
    import ray.train
    import torch

    cfg = ExperimentConfig.model_validate(config["cfg"])
    os.environ.update(config["secrets"])  # this process's memory only: never a file, never a log
    torch.set_num_threads(cfg.train.threads or cfg.scaling.cpus_per_worker)
    staging = Path(tempfile.mkdtemp(prefix="selfsup-checkpoint-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            pretrain_here(cfg, under_ray=True, staging=staging)
        else:
            with checkpoint.as_directory() as path:
                if rank() == 0:  # what an interrupted attempt wrote after it, which Ray never took
                    remove_after(cfg.run_dir, read_progress(path)["samples_seen"], remote=cfg.run_url)
                pretrain_here(cfg, under_ray=True, resume_from=Path(path), staging=staging)
    except FATAL as err:  # every rank meets these alike; ending normally spends no retry
        return f"{err}"  # (not a metrics-only report: Ray's Result keeps only the metrics of checkpoints)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_training(cfg: ExperimentConfig, use_ray: bool = True, address: str | None = None) -> dict:
    """The driver: hold the run's lease (a second driver of the same run is refused), then train
    under Ray Train or in this process; returns the summary."""
    with run_lease(cfg):
        return run_pretraining(cfg, address) if use_ray else pretrain_here(cfg)


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with local paths made absolute (Ray workers run in other directories)."""
    def fix(p: str | None) -> str | None:
        if p is None or "://" in p or p.startswith("pipe:"):
            return p
        return str(Path(p).expanduser().resolve())

    data = cfg.data.model_copy(update={"train": fix(cfg.data.train), "test": fix(cfg.data.test)})
    return cfg.model_copy(update={"run_root": fix(cfg.run_root), "data": data})


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start Ray here with the dashboard on 127.0.0.1 (Ray Train
    queries its state API, which the dashboard serves)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a Ray of its own on this machine (--address auto joins one already running)")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True, configure_logging=False)


def run_pretraining(cfg: ExperimentConfig, address: str | None = None) -> dict:
    """Pretrain under Ray Train, checkpoints in Ray's storage under ``run_root``; returns the summary
    the loop wrote to ``<run>/summary.json``, its ``checkpoint`` the one Ray holds as the latest."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from selfsup.cluster.secrets import job_secrets

    cfg = absolute_paths(cfg)
    init_ray(address)
    scaling = ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                  **({"GPU": 1} if cfg.scaling.use_gpu else {})})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "secrets": job_secrets()},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(name=cfg.name, storage_path=cfg.run_root,
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.return_value:  # rank 0 stopped on an error that a retry cannot heal
        raise RunFailed(result.return_value)
    if cfg.run_url:  # rank 0 may have run on another node: the bucket's summary, never a stale one here
        from selfsup.core.storage import pull_run_files

        pull_run_files(cfg.run_url, cfg.run_dir)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    if result.checkpoint is not None:
        summary["checkpoint"] = result.checkpoint.path if not cfg.run_url else f"{cfg.run_url}/checkpoints/" \
            f"{Path(result.checkpoint.path).name}"
    return summary
