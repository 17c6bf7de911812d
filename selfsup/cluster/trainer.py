"""Ray Train: runs ``pipelines.pretrain`` in a ``TorchTrainer``, one process per GPU (or CPU slot).

Locally it starts Ray on this machine; with ``RAY_ADDRESS`` set (or ``address``) the same call
runs on that cluster. Ray's token authentication stays on (``RAY_AUTH_MODE=token`` unless set).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import ExperimentConfig
from ..pipelines.pretrain import FileReporter, pretrain
from .tracking import WandbReporter, start_run

log = logging.getLogger("selfsup.cluster")


class RayReporter:
    """Sends metrics to ``ray.train.report`` (so Ray's dashboard and result see them), then to ``inner``."""

    def __init__(self, inner):
        self.inner = inner

    def log(self, step: int, metrics: dict) -> None:
        import ray.train

        self.inner.log(step, metrics)
        ray.train.report({"step": step, **metrics})

    def checkpoint(self, step: int, path: Path) -> None:
        self.inner.checkpoint(step, path)

    def finish(self, summary: dict) -> None:
        self.inner.finish(summary)


class RunSyncReporter:
    """Pushes the run's metrics and summary to its bucket (``run_root: s3://…``) when the run finishes."""

    def __init__(self, inner, cfg: ExperimentConfig):
        self.inner, self.cfg = inner, cfg

    def log(self, step: int, metrics: dict) -> None:
        self.inner.log(step, metrics)

    def checkpoint(self, step: int, path: Path) -> None:
        self.inner.checkpoint(step, path)

    def finish(self, summary: dict) -> None:
        from ..pipelines.storage import push_run_files
        from ..ssl.distributed import rank

        self.inner.finish(summary)
        if rank() == 0:
            push_run_files(self.cfg.run_dir, self.cfg.run_url)


def make_reporter(cfg: ExperimentConfig, under_ray: bool):
    """FileReporter, wrapped for Ray and W&B (W&B on rank 0 only), and for the bucket of a remote run."""
    from ..ssl.distributed import rank

    reporter = FileReporter(cfg.run_dir)
    if cfg.run_url:
        from ..pipelines.storage import pull_run_files

        if rank() == 0:
            pull_run_files(cfg.run_url, cfg.run_dir)  # the W&B id and metrics of an earlier attempt
        reporter = RunSyncReporter(reporter, cfg)
    if under_ray:
        reporter = RayReporter(reporter)
    run = None
    if rank() == 0:
        run = start_run(cfg.run_dir, cfg.name, cfg.tracking.mode, cfg.tracking.project, cfg.tracking.entity,
                        cfg.model_dump(mode="json"), job_type="pretrain")
    return WandbReporter(reporter, run)


def _train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    cfg = ExperimentConfig.model_validate(config)
    torch_threads = cfg.train.threads or cfg.scaling.cpus_per_worker
    import torch

    torch.set_num_threads(torch_threads)
    pretrain(cfg, make_reporter(cfg, under_ray=True))


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

    from ray.train import FailureConfig, RunConfig, ScalingConfig
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
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures)),
    )
    trainer.fit()
    if cfg.run_url and not (cfg.run_dir / "summary.json").is_file():  # rank 0 ran on another node
        from ..pipelines.storage import pull_run_files

        pull_run_files(cfg.run_url, cfg.run_dir)
    return json.loads((cfg.run_dir / "summary.json").read_text())
