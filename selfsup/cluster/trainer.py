"""Ray Train: runs the ``Trainer`` in a ``TorchTrainer``, one process per GPU (or CPU slot);
``pretrain_here`` runs the same Trainer in this process (``--no-ray``). Both report to the run's
sinks: its files, W&B, its bucket, and Ray under Ray.

Locally it starts Ray on this machine; with ``RAY_ADDRESS`` set (or ``address``) the same call
runs on that cluster. Ray's token authentication stays on (``RAY_AUTH_MODE=token`` unless set).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from selfsup.config import ExperimentConfig
from selfsup.core.checkpoint import latest_checkpoint
from selfsup.core.distributed import rank
from selfsup.core.reporter import FileReporter, Reporters
from selfsup.tracking.wandb_run import WandbReporter, start_run
from selfsup.train.trainer import Trainer

log = logging.getLogger("selfsup.cluster")


class RayReporter:
    """Sink (every rank): each record and each checkpoint go to ``ray.train.report``, so Ray's
    dashboard, result and checkpoint storage see them. Every rank reports the same number of times;
    rank 0 passes the checkpoint directory, the others none."""

    def log(self, step: int, metrics: dict) -> None:
        import ray.train

        ray.train.report({"step": step, **metrics})

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)


class RunSyncReporter:
    """Sink (rank 0): pushes the run's metrics and summary to its bucket (``run_root: s3://…``) when
    the run finishes (checkpoints push them too, see ``selfsup.core.checkpoint``)."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

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
        sinks.append(RunSyncReporter(cfg))
    if under_ray:
        sinks.append(RayReporter())
    if rank() == 0 and (run := start_run(cfg.run_dir, cfg.name, cfg.tracking.mode, cfg.tracking.project,
                                         cfg.tracking.entity, cfg.model_dump(mode="json"), job_type="pretrain")):
        sinks.append(WandbReporter(run))
    return Reporters(*sinks)


def pretrain_here(cfg: ExperimentConfig, under_ray: bool = False) -> dict:
    """Train ``cfg`` in this process (``--no-ray``, or one Ray worker), from the run's latest
    checkpoint if it has one; returns the summary."""
    reporter = run_reporters(cfg, under_ray)
    return Trainer(cfg, reporter, latest_checkpoint(cfg.run_dir, remote=cfg.run_url)).fit()


def _train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    cfg = ExperimentConfig.model_validate(config)
    torch_threads = cfg.train.threads or cfg.scaling.cpus_per_worker
    import torch

    torch.set_num_threads(torch_threads)
    pretrain_here(cfg, under_ray=True)


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
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True, configure_logging=False)


def run_pretraining(cfg: ExperimentConfig, address: str | None = None) -> dict:
    """Pretrain under Ray Train; returns the summary the loop wrote to ``<run>/summary.json``."""
    import json

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    init_ray(address)
    scaling = ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                  **({"GPU": 1} if cfg.scaling.use_gpu else {})})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(name=cfg.name, storage_path=str(cfg.run_dir.parent / "_ray"),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
    )
    trainer.fit()
    if cfg.run_url and not (cfg.run_dir / "summary.json").is_file():  # rank 0 ran on another node
        from selfsup.core.storage import pull_run_files

        pull_run_files(cfg.run_url, cfg.run_dir)
    return json.loads((cfg.run_dir / "summary.json").read_text())
