"""The Ray driver: a run under Ray Train, one worker process per GPU (or CPU slot), each training its
rank with the in-process driver (:func:`selfsup.cluster.in_process.train_here`).

Without ``address`` or ``RAY_ADDRESS`` it starts a Ray of its own on this machine (never one that
another program started: ``--address auto`` joins that); with them the same call runs on that
cluster. Ray's token authentication stays on (``RAY_AUTH_MODE=token`` unless set).

Checkpoints go to Ray's checkpoint storage, ``RunConfig(storage_path=run_root)``: the run folder
locally, a bucket (or NFS) for several nodes. Every start and restarted worker group resumes from the
run's own latest good checkpoint (``decide_resume``, the rule ``--no-ray`` follows), whatever Ray's
bookkeeping says; Ray deletes none (``num_to_keep=None``): rank 0 prunes by write order. An error
said in one line (``OneLineError``: no space, a bad config or checkpoint, missing data, a lost lease)
ends the run without spending ``max_failures``. Ray's workers write under the driver's lease (its
token). The console shows selfsup's lines only: Ray's loggers write to ``<run>/logs/driver.log`` and its
workers' output stays in Ray's session logs (``<run>/logs/ray`` links them), unless -v asks for them.
Only :func:`selfsup.cluster.driver.pretrain` calls :func:`train_under_ray`, after its checks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selfsup.cluster import in_process
from selfsup.cluster.sinks import RayReporter
from selfsup.config import ExperimentConfig, ScalingConfig, override_text
from selfsup.core.distributed import rank
from selfsup.core.fence import fenced
from selfsup.errors import OneLineError, RunFailed
from selfsup.tasks import task_for
from selfsup.train.console import POLL_SECONDS, ProgressConsole, follow_records, follow_worker_log, worker_log_handler
from selfsup.train.lease import Fence

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's own record of a run's checkpoints
LOGS = "logs"  # in the run folder: driver.log, rank 0's selfsup lines and a link to Ray's session logs
WORKER_LOG = f"{LOGS}/worker.jsonl"

log = logging.getLogger("selfsup.cluster")


def driver_follows(cfg: ExperimentConfig) -> bool:
    """Whether the driver draws the progress from the run folder's ``metrics.jsonl`` (a local or
    shared folder; a run in a bucket is shown by its rank 0 instead)."""
    return not cfg.run_url


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with local paths made absolute (Ray workers run in other directories)."""

    def fix(p: str | None) -> str | None:
        if p is None or "://" in p or p.startswith("pipe:"):
            return p
        return str(Path(p).expanduser().resolve())

    data = cfg.data.model_copy(update={"train": fix(cfg.data.train), "test": fix(cfg.data.test)})
    return cfg.model_copy(update={"run_root": fix(cfg.run_root), "data": data})


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start Ray here with the dashboard on 127.0.0.1 (Ray Train
    queries its state API, which the dashboard serves); True when this call connected or started it."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    verbose = log.isEnabledFor(logging.DEBUG)  # -v: Ray forwards every worker's and actor's output to the console
    if not sys.stderr.isatty():  # ... without the colour codes of its prefixes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address:
        log.info("joining the Ray cluster at %s", address)
        context = ray.init(address=address, log_to_driver=verbose, configure_logging=False)
    else:
        log.info("starting a Ray of its own on this machine (--address auto joins one already running)")
        # one machine has no node to drain: Ray Train's preemption watcher only logs an error line at start
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=verbose,
            configure_logging=False,
        )
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url.removeprefix("http://"))
    return True


def unmet_resources(scaling: ScalingConfig, resources: dict[str, float]) -> str | None:
    """Why Ray could never place the run's workers on a cluster of ``resources`` (its totals, as
    ``ray.cluster_resources()``), as one line saying what to change; None when they fit. An elastic
    ``num_workers`` [min, max] needs its min."""
    workers = scaling.num_workers[0] if isinstance(scaling.num_workers, tuple) else scaling.num_workers
    asked = f"scaling.num_workers={override_text(scaling.num_workers)}"
    gpus, cpus, each = resources.get("GPU", 0), resources.get("CPU", 0), scaling.cpus_per_worker
    if scaling.use_gpu and gpus < 1:
        return (
            "scaling.use_gpu=true but the Ray cluster has no GPU: set scaling.use_gpu=false or submit to a "
            "cluster with GPUs"
        )
    if scaling.use_gpu and gpus < workers:
        return (
            f"{asked} with scaling.use_gpu=true needs {workers} GPUs (one a worker) but the Ray cluster has "
            f"{gpus:g}: set scaling.num_workers={int(gpus)} or submit to a cluster with more GPUs"
        )
    if cpus < each:
        return (
            f"scaling.cpus_per_worker={each} but the Ray cluster has {cpus:g} CPUs: set "
            f"scaling.cpus_per_worker={int(cpus)} or less"
        )
    if cpus < workers * each:
        return (
            f"{asked} x scaling.cpus_per_worker={each} needs {workers * each} CPUs but the Ray cluster has "
            f"{cpus:g}: set scaling.num_workers={int(cpus // each)} or lower scaling.cpus_per_worker"
        )
    return None


def cluster_capacity() -> dict[str, float]:
    """The most the connected Ray cluster can offer: an autoscaler's maximum (its node types times their
    max count) when it has one, else what its nodes hold now (``ray.cluster_resources()``)."""
    import ray
    from ray._private import state

    try:
        most = state.state.get_max_resources_from_cluster_config()
    except Exception as err:  # a private API: an older or newer Ray may lack it
        log.debug("no autoscaler maximum (%s); using the cluster's current resources", err)
        most = None
    return most or ray.cluster_resources()


class PlainFormatter(logging.Formatter):
    """Lines without the terminal escape codes (colours, bold) that Ray puts in some of its messages."""

    def format(self, record: logging.LogRecord) -> str:
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", super().format(record))


@contextmanager
def driver_log(run_dir: Path, verbose: bool) -> Iterator[Path]:
    """While the body runs, ``<run>/logs/driver.log`` gets every log line of this process: selfsup's and
    Ray's own. :func:`init_ray` leaves Ray's loggers without a handler of their own, so their lines reach
    logging's last resort, which is this file here (the console with ``verbose``, -v)."""
    path = Path(run_dir) / LOGS / "driver.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    last_resort = logging.lastResort
    logging.getLogger().addHandler(handler)
    if not verbose:
        logging.lastResort = handler
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(handler)
        logging.lastResort = last_resort
        handler.close()


def link_ray_logs(run_dir: Path) -> None:
    """``<run>/logs/ray``: a link to the Ray session's logs on this machine (its workers' and actors'
    output); a cluster joined from elsewhere keeps them on its nodes."""
    from ray._private import worker

    try:  # a private API: an older or newer Ray may lack it
        target = Path(worker._global_node.get_logs_dir_path())
    except Exception as err:  # noqa: BLE001
        log.debug("no Ray session logs to link (%s)", err)
        return
    link = Path(run_dir) / LOGS / "ray"
    link.unlink(missing_ok=True)
    link.symlink_to(target, target_is_directory=True)
    log.debug("Ray's session logs: %s", target)


def worker_failure(err: Exception, driver_log_path: Path) -> str:
    """One line for a Ray Train failure (a worker's error, or the controller's), after its whole text
    (the worker's traceback) is appended to the driver log."""
    failures = getattr(err, "worker_failures", None) or {}
    first = failures[min(failures)] if failures else getattr(err, "controller_failure", err)
    base = getattr(first, "_base_exc", first)  # Ray Train wraps a worker's exception with its traceback
    with open(driver_log_path, "a", encoding="utf-8") as f:
        f.write(f"{err}\n{first}\n")
    said = str(base).strip().splitlines()
    where = f"rank {min(failures)}" if failures else "Ray Train"
    return (
        f"{where} failed: {type(base).__name__}{': ' + said[0] if said else ''} (the traceback is in {driver_log_path})"
    )


def fit_interruptibly(trainer):
    """``trainer.fit()`` in a thread of its own, so that Ctrl-C reaches the caller as KeyboardInterrupt
    (and the Ray this run started goes down with :func:`train_under_ray`): in the main thread Ray Train
    would take SIGINT itself, print its own lines and exit 1."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="selfsup-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_SECONDS)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def forget_ray_snapshot(cfg: ExperimentConfig) -> None:
    """Delete Ray Train's record of the run's checkpoints from an earlier driver: the run folder's own
    checkpoints decide where it resumes, and Ray restoring that record would refuse checkpoints it
    lists that were pruned since, or delete ones newer than it knows."""
    from selfsup.core import storage

    storage.delete(f"{cfg.run_url or cfg.run_dir}/{RAY_SNAPSHOT}")


def _worker(config: dict) -> str | None:
    """Entry point of each Ray Train worker: resume from the run folder's latest good checkpoint (not
    Ray's, which may be older), writing under the driver's lease token. Returns the message of an
    error that a retry cannot heal (Ray hands rank 0's to the driver), else None."""
    import torch

    cfg = ExperimentConfig.model_validate(config["cfg"])
    os.environ.update(config["secrets"])  # this process's memory only: never a file, never a log
    if not config["verbose"]:  # rank 0's selfsup lines reach the driver's console through the run folder
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("selfsup").setLevel(logging.INFO)
        if rank() == 0 and not cfg.run_url:
            logging.getLogger("selfsup").addHandler(worker_log_handler(cfg.run_dir / WORKER_LOG))
    torch.set_num_threads(cfg.train.threads or cfg.scaling.cpus_per_worker)
    fence = Fence(*config["lease"]) if config["lease"] else None
    staging = Path(tempfile.mkdtemp(prefix="selfsup-checkpoint-"))
    console = [ProgressConsole(task_for(cfg).unit, live=False)] if rank() == 0 and not driver_follows(cfg) else []
    try:
        in_process.train_here(cfg, [RayReporter(cfg, fence), *console], fence, staging)
    except (OneLineError, FileNotFoundError) as err:  # every rank meets these alike; ending normally spends no retry
        return f"{err}"  # (not a metrics-only report: Ray's Result keeps only the metrics of checkpoints)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None


def train_under_ray(cfg: ExperimentConfig, address: str | None = None, fence: Fence | None = None) -> dict:
    """Pretrain under Ray Train, checkpoints in Ray's storage under ``run_root``; returns the summary
    the loop wrote to ``<run>/summary.json``, its ``checkpoint`` the one Ray holds as the latest. Workers
    the cluster can never place are refused first (:class:`RunFailed`). A Ray that
    this call started (or connected to) is shut down when it returns. Ray's workers write under ``fence``."""
    import ray

    with driver_log(cfg.run_dir, log.isEnabledFor(logging.DEBUG)) as path:
        connected = init_ray(address)
        try:
            link_ray_logs(cfg.run_dir)
            return _fit_torch_trainer(cfg, fence, path)
        finally:  # a Ray this run started or joined is let go: its idle processes would slow what comes next
            if connected:
                ray.shutdown()


def _fit_torch_trainer(cfg: ExperimentConfig, fence: Fence | None, driver_log_path: Path) -> dict:
    """:func:`train_under_ray` once Ray is up: fit the TorchTrainer and return the summary. Rank 0's
    selfsup lines reach this console (:func:`follow_worker_log`); a worker's error is one line."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, TrainingFailedError
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    from selfsup.cluster.secrets import job_secrets

    cfg, verbose = absolute_paths(cfg), log.isEnabledFor(logging.DEBUG)  # -v: every line of Ray and its workers
    if problem := unmet_resources(cfg.scaling, cluster_capacity()):  # else Ray waits for them forever
        raise RunFailed(problem)
    scaling = RayScaling(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
    )
    with fenced(fence):
        forget_ray_snapshot(cfg)
    lease = (fence.location, fence.token) if fence is not None else None
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "secrets": job_secrets(),
            "verbose": verbose,
            "lease": lease,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.run_root,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # rank 0 prunes
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )
    try:
        if driver_follows(cfg):
            with (
                follow_records(cfg.run_dir / "metrics.jsonl", ProgressConsole(task_for(cfg).unit)),
                follow_worker_log(cfg.run_dir / WORKER_LOG),
            ):
                result = fit_interruptibly(trainer)
        else:
            result = fit_interruptibly(trainer)
    except TrainingFailedError as err:
        raise RunFailed(worker_failure(err, driver_log_path)) from None
    if result.return_value:  # rank 0 stopped on an error that a retry cannot heal
        raise RunFailed(result.return_value)
    if cfg.run_url:  # rank 0 may have run on another node: the bucket's summary, never a stale one here
        from selfsup.core.storage import pull_run_files

        pull_run_files(cfg.run_url, cfg.run_dir)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    if result.checkpoint is not None:
        summary["checkpoint"] = (
            result.checkpoint.path
            if not cfg.run_url
            else f"{cfg.run_url}/checkpoints/{Path(result.checkpoint.path).name}"
        )
    return summary
