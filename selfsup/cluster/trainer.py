"""Ray Train: runs the ``Trainer`` in a ``TorchTrainer``, one process per GPU (or CPU slot);
``pretrain_here`` runs the same Trainer in this process (``--no-ray``). Both report to the run's
sinks: its files, W&B, its bucket, and Ray under Ray.

Without ``address`` or ``RAY_ADDRESS`` it starts a Ray of its own on this machine (never one that
another program started: ``--address auto`` joins that); with them the same call runs on that
cluster. Ray's token authentication stays on (``RAY_AUTH_MODE=token`` unless set).

Under Ray, checkpoints go to Ray's checkpoint storage, ``RunConfig(storage_path=run_root)``: the run
folder locally, a bucket (or NFS) for several nodes. Every start and restarted worker group resumes
from the run's own latest good checkpoint (``resume_point``, the rule ``--no-ray`` follows), whatever
Ray's bookkeeping says; Ray deletes none (``num_to_keep=None``): rank 0 prunes by write order. Errors
that a retry cannot heal (no space, bad config or checkpoint, missing data, a lost lease) end the run
without spending ``max_failures``. One driver per run folder: :func:`run_training` holds the run's
lease, and every write into the run passes its fence (Ray's workers get its token). The console shows
selfsup's lines only: Ray's loggers write to ``<run>/logs/driver.log`` and its workers' output stays in
Ray's session logs (``<run>/logs/ray`` links them), unless -v asks for them. Before any training the driver
refuses what could never run: resuming checkpoints trained with another config (``RESUMABLE_KEYS``
aside; ``restart`` sets the old run aside instead), ``scaling.use_gpu`` without a GPU here (``--no-ray``),
and workers the Ray cluster cannot ever place (Ray would wait for them forever).
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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from selfsup.config import ConfigError, ExperimentConfig, ScalingConfig, config_differences, load_config, parse_config
from selfsup.core.checkpoint import (
    CheckpointError,
    CheckpointSpaceError,
    list_checkpoints,
    prune_checkpoints,
    read_progress,
    resume_point,
)
from selfsup.core.distributed import rank, world_size
from selfsup.core.fence import LeaseLost, RunLeaseError, fenced
from selfsup.core.reporter import FileReporter, Reporters, truncate_records
from selfsup.data.preflight import check_data
from selfsup.data.reader import ManifestError
from selfsup.errors import OneLineError
from selfsup.tasks import task_for
from selfsup.tracking.wandb_run import TrackingError, WandbReporter
from selfsup.train.console import POLL_SECONDS, ProgressConsole, follow_records, follow_worker_log, worker_log_handler
from selfsup.train.lease import LEASE, Fence, run_lease
from selfsup.train.trainer import Trainer

# a retry cannot heal these:
FATAL = (CheckpointSpaceError, CheckpointError, ConfigError, ManifestError, FileNotFoundError, TrackingError,
         RunLeaseError)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's own record of a run's checkpoints
SHOWN_CHANGES = 4  # a refused resume names this many changed keys, then a count
LOGS = "logs"  # in the run folder: driver.log, rank 0's selfsup lines and a link to Ray's session logs
WORKER_LOG = f"{LOGS}/worker.jsonl"


class RunFailed(OneLineError, RuntimeError):
    """The run stopped on an error that retrying cannot heal; the message says what to do."""


log = logging.getLogger("selfsup.cluster")
notes = logging.getLogger("selfsup.note")  # the console says these as `selfsup: note: ...`


class RayReporter:
    """Sink (every rank): each checkpoint, with the last record, goes to ``ray.train.report``, so Ray's
    result and checkpoint storage see it. Every rank reports the same number of times; rank 0 passes
    the checkpoint directory, the others none. Rank 0 reports under ``fence`` (Ray's worker copies the
    checkpoint into the run folder within the call), then prunes to ``keep`` by write order.

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
            try:
                with fenced(self.fence):
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                                     checkpoint_dir_name=f"checkpoints/{path.name}")
            except LeaseLost:
                if world_size() == 1:
                    raise
                ray.train.report(record)  # refused; the other ranks wait for this report, and every rank
                ray.train.report(record)  # stops at the next lease check (Trainer._check_lease)
                return
            if self.cfg.run_url:
                from selfsup.core.storage import delete_checkpoint, remote_checkpoints

                with fenced(self.fence):
                    for old in remote_checkpoints(self.cfg.run_url)[:-self.cfg.train.keep_checkpoints]:
                        delete_checkpoint(self.cfg.run_url, old)
            else:
                prune_checkpoints(self.cfg.run_dir, self.cfg.train.keep_checkpoints, self.fence)
        ray.train.report(record)  # returns once the controller has taken the checkpoint's report


class RunSyncReporter:
    """Sink (rank 0): pushes the run's metrics and summary to its bucket (``run_root: s3://…``) when
    the run finishes, and under Ray its metrics with each checkpoint (without Ray, ``save_checkpoint``
    does that), so that rank 0 on another node resumes them."""

    def __init__(self, cfg: ExperimentConfig, under_ray: bool, fence: Fence | None):
        self.cfg, self.under_ray, self.fence = cfg, under_ray, fence

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None:
        from selfsup.core.storage import push_run_files

        if self.under_ray and path is not None:
            with fenced(self.fence):
                push_run_files(self.cfg.run_dir, self.cfg.run_url)

    def finish(self, summary: dict) -> None:
        from selfsup.core.storage import push_run_files

        if rank() == 0:
            with fenced(self.fence):
                push_run_files(self.cfg.run_dir, self.cfg.run_url)


def run_reporters(cfg: ExperimentConfig, under_ray: bool, fence: Fence | None = None) -> Reporters:
    """The run's sinks, writing under ``fence``: its files; its bucket when remote (whose run files, the
    W&B id and metrics of an earlier attempt, are pulled first); Ray under Ray; W&B on rank 0 unless disabled."""
    sinks: list[object] = [FileReporter(cfg.run_dir, fence)]
    if cfg.run_url:
        from selfsup.core.storage import pull_run_files

        if rank() == 0:
            pull_run_files(cfg.run_url, cfg.run_dir)
        sinks.append(RunSyncReporter(cfg, under_ray, fence))
    if under_ray:
        sinks.append(RayReporter(cfg, fence))
    if rank() == 0 and cfg.tracking.mode != "disabled":
        sinks.append(WandbReporter(cfg))
    if rank() == 0 and not (under_ray and driver_follows(cfg)):  # under Ray, its output reaches the driver as lines
        sinks.append(ProgressConsole(task_for(cfg).unit, live=None if not under_ray else False))
    return Reporters(*sinks)


def driver_follows(cfg: ExperimentConfig) -> bool:
    """Whether the driver draws the progress from the run folder's ``metrics.jsonl`` (a local or
    shared folder; a run in a bucket is shown by its rank 0 instead)."""
    return not cfg.run_url


def _shown(value) -> str:
    """A config value as an override would write it (``16``, ``true``, ``[1, 4]``, ``simclr``)."""
    return value if isinstance(value, str) else json.dumps(value)


def _run_location(cfg: ExperimentConfig) -> str:
    return cfg.run_url or str(cfg.run_dir)


def trained_config(cfg: ExperimentConfig) -> tuple[str, ExperimentConfig] | None:
    """Where the run's latest complete checkpoint is and the config it was trained with (its
    ``config.yaml``, the only file read from a bucket); None before the first checkpoint."""
    if not cfg.run_url:
        found = list_checkpoints(cfg.run_dir)
        return (str(found[-1]), load_config(found[-1] / "config.yaml")) if found else None
    from selfsup.core import storage

    names = storage.remote_checkpoints(cfg.run_url)
    if not names:
        return None
    where = f"{cfg.run_url}/checkpoints/{names[-1]}"
    with storage.open_read(f"{where}/config.yaml") as f:
        try:
            tree = yaml.safe_load(f.read())
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}/config.yaml is not valid YAML: {err}") from None
    return where, parse_config(tree or {}, source=f"{where}/config.yaml")


def refuse_changed_config(cfg: ExperimentConfig) -> None:
    """Raise :class:`RunFailed`, naming each changed key with its old and new value, when the run's
    latest checkpoint was trained with a config that differs from ``cfg`` beyond ``RESUMABLE_KEYS``."""
    found = trained_config(cfg)
    if found is None:
        return
    changed = config_differences(found[1].model_dump(mode="json"), cfg.model_dump(mode="json"))
    if not changed:
        return
    shown = list(changed.items())[:SHOWN_CHANGES]
    more = f" (and {len(changed) - len(shown)} more keys)" if len(changed) > len(shown) else ""
    old = ", ".join(f"{k}={_shown(v[0])}" for k, v in shown)
    new = _shown(shown[0][1][1]) if len(changed) == 1 else ", ".join(f"{k}={_shown(v[1])}" for k, v in shown)
    run = _run_location(cfg)
    afresh = "pick another name=... to start afresh" if cfg.run_url else \
        f"pass --restart to start afresh (the old run is kept as {run}.old-<time>)"
    raise RunFailed(f"{run} has checkpoints trained with {old}{more}; this config says {new}. Resume with the "
                    f"same config, or {afresh}")


def set_aside(cfg: ExperimentConfig) -> Path | None:
    """``--restart``: move everything in the run folder but the lease (which this driver holds) into
    ``<run>.old-<time>`` beside it; nothing is deleted. Returns that folder, None when there was nothing."""
    if cfg.run_url:
        raise RunFailed(f"--restart keeps the old run aside, which only works for a local run_root; for "
                        f"{cfg.run_url} pick another name=..., or delete that prefix first")
    run = Path(cfg.run_dir)
    if run.name in ("", ".", "..") or run.parent.resolve() != Path(cfg.run_root).resolve():
        raise RunFailed(f"--restart sets aside only a run folder inside run_root, and {run} is not one: "
                        "set name=... to a plain folder name")
    old = [p for p in run.iterdir() if p.name != LEASE and not p.name.startswith(f".{LEASE}.")] if run.is_dir() else []
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept, n = run.with_name(f"{run.name}.old-{stamp}"), 1
    while kept.exists():
        n += 1
        kept = run.with_name(f"{run.name}.old-{stamp}-{n}")
    kept.mkdir()
    for p in old:
        os.replace(p, kept / p.name)
    log.info("set the old run aside as %s", kept)
    return kept


def check_gpu_here(cfg: ExperimentConfig) -> None:
    """Raise :class:`RunFailed` when ``scaling.use_gpu`` asks for a GPU that torch cannot see in this process."""
    import torch

    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise RunFailed(f"scaling.use_gpu=true but torch sees no CUDA GPU here (torch {torch.__version__}, "
                        f"{built}): set scaling.use_gpu=false, or run where a GPU is visible")


def agreed_resume_point(cfg: ExperimentConfig, fence: Fence | None) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 picks the run's latest good one (``resume_point``:
    damaged ones named and set aside under ``fence``), the others take its name and, from a bucket,
    pull it. None to start afresh."""
    import torch.distributed as dist

    name = [None]
    if rank() == 0:
        found = resume_point(cfg.run_dir, cfg.run_url, fence)
        name = [found.name if found is not None else None]
    if world_size() > 1:
        dist.broadcast_object_list(name)
    if name[0] is None:
        return None
    if cfg.run_url and rank() != 0:
        from selfsup.core.storage import pull_checkpoint

        pull_checkpoint(cfg.run_url, name[0], cfg.run_dir)
    return Path(cfg.run_dir) / "checkpoints" / name[0]


def pretrain_here(cfg: ExperimentConfig, under_ray: bool = False, staging: Path | None = None,
                  fence: Fence | None = None) -> dict:
    """Train ``cfg`` in this process (``--no-ray``, or one Ray worker) from the run's latest good
    checkpoint if it has one, every write under ``fence``; returns the summary. Records past the
    checkpoint's position (all, starting afresh) are dropped from ``metrics.jsonl``, so it reads as one
    run. Without Ray it first refuses a GPU it cannot see and a changed config (Ray's driver checks these)."""
    if not under_ray:
        check_gpu_here(cfg)
        refuse_changed_config(cfg)
    reporter = run_reporters(cfg, under_ray, fence)  # a remote run's metrics are pulled first
    resume_from = agreed_resume_point(cfg, fence)
    if rank() == 0:
        progress = read_progress(resume_from) if resume_from is not None else {"samples_seen": 0}
        if "samples_seen" not in progress:  # never truncate the records to a checkpoint that is gone
            raise CheckpointError(f"{resume_from} was removed while being read; run the same command again")
        truncate_records(cfg.run_dir / "metrics.jsonl", progress["samples_seen"], fence)
    trainer = Trainer(cfg, reporter, resume_from, staging, fence)
    reporter.start()  # W&B starts only now, once the Trainer has checked the config, data and checkpoint
    return trainer.fit()


def _train_worker(config: dict) -> str | None:
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
    try:
        pretrain_here(cfg, under_ray=True, staging=staging, fence=fence)
    except FATAL as err:  # every rank meets these alike; ending normally spends no retry
        return f"{err}"  # (not a metrics-only report: Ray's Result keeps only the metrics of checkpoints)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def preflight(cfg: ExperimentConfig, use_ray: bool) -> None:
    """Refuse data that can never train ``cfg`` (:class:`DataProblem`, before Ray starts) and say once
    what the config converts. Under Ray the batch is checked against the most workers it may get."""
    workers = cfg.scaling.num_workers if use_ray else 1
    for line in check_data(cfg, max(workers) if isinstance(workers, tuple) else workers):
        notes.info(line)


def drive(cfg: ExperimentConfig, use_ray: bool = True, address: str | None = None, restart: bool = False,
          fence: Fence | None = None) -> dict:
    """What the driver does while it holds the run's lease (``fence``, its writes' fence): check the data
    (:func:`preflight`), with ``restart`` set the old run aside, then train under Ray Train or in this
    process; returns the summary."""
    preflight(cfg, use_ray)
    if restart:
        with fenced(fence):
            set_aside(cfg)
    return run_pretraining(cfg, address, fence) if use_ray else pretrain_here(cfg, fence=fence)


def run_training(cfg: ExperimentConfig, use_ray: bool = True, address: str | None = None,
                 restart: bool = False) -> dict:
    """The driver: hold the run's lease (a second driver of the same run is refused), then
    :func:`drive`; returns the summary."""
    with run_lease(cfg) as lease:
        return drive(cfg, use_ray, address, restart, lease.fence)


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
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=verbose, configure_logging=False)
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url.removeprefix("http://"))
    return True


def unmet_resources(scaling: ScalingConfig, resources: dict[str, float]) -> str | None:
    """Why Ray could never place the run's workers on a cluster of ``resources`` (its totals, as
    ``ray.cluster_resources()``), as one line saying what to change; None when they fit. An elastic
    ``num_workers`` [min, max] needs its min."""
    workers = scaling.num_workers[0] if isinstance(scaling.num_workers, tuple) else scaling.num_workers
    asked = f"scaling.num_workers={_shown(scaling.num_workers)}"
    gpus, cpus, each = resources.get("GPU", 0), resources.get("CPU", 0), scaling.cpus_per_worker
    if scaling.use_gpu and gpus < 1:
        return ("scaling.use_gpu=true but the Ray cluster has no GPU: set scaling.use_gpu=false or submit to a "
                "cluster with GPUs")
    if scaling.use_gpu and gpus < workers:
        return (f"{asked} with scaling.use_gpu=true needs {workers} GPUs (one a worker) but the Ray cluster has "
                f"{gpus:g}: set scaling.num_workers={int(gpus)} or submit to a cluster with more GPUs")
    if cpus < each:
        return (f"scaling.cpus_per_worker={each} but the Ray cluster has {cpus:g} CPUs: set "
                f"scaling.cpus_per_worker={int(cpus)} or less")
    if cpus < workers * each:
        return (f"{asked} x scaling.cpus_per_worker={each} needs {workers * each} CPUs but the Ray cluster has "
                f"{cpus:g}: set scaling.num_workers={int(cpus // each)} or lower scaling.cpus_per_worker")
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


def run_pretraining(cfg: ExperimentConfig, address: str | None = None, fence: Fence | None = None) -> dict:
    """Pretrain under Ray Train, checkpoints in Ray's storage under ``run_root``; returns the summary
    the loop wrote to ``<run>/summary.json``, its ``checkpoint`` the one Ray holds as the latest. A changed
    config, and workers the cluster can never place, are refused first (:class:`RunFailed`). A Ray that
    this call started (or connected to) is shut down when it returns. Ray's workers write under ``fence``."""
    import ray

    refuse_changed_config(cfg)
    with driver_log(cfg.run_dir, log.isEnabledFor(logging.DEBUG)) as path:
        connected = init_ray(address)
        try:
            link_ray_logs(cfg.run_dir)
            return _fit_under_ray(cfg, fence, path)
        finally:  # a Ray this run started or joined is let go: its idle processes would slow what comes next
            if connected:
                ray.shutdown()


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
    return (f"{where} failed: {type(base).__name__}{': ' + said[0] if said else ''} (the traceback is in "
            f"{driver_log_path})")


def fit_interruptibly(trainer):
    """``trainer.fit()`` in a thread of its own, so that Ctrl-C reaches the caller as KeyboardInterrupt
    (and the Ray this run started goes down with :func:`run_pretraining`): in the main thread Ray Train
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

    storage.delete(f"{_run_location(cfg)}/{RAY_SNAPSHOT}")


def _fit_under_ray(cfg: ExperimentConfig, fence: Fence | None, driver_log_path: Path) -> dict:
    """:func:`run_pretraining` once Ray is up: fit the TorchTrainer and return the summary. Rank 0's
    selfsup lines reach this console (:func:`follow_worker_log`); a worker's error is one line."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, TrainingFailedError
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    from selfsup.cluster.secrets import job_secrets

    cfg, verbose = absolute_paths(cfg), log.isEnabledFor(logging.DEBUG)  # -v: every line of Ray and its workers
    if problem := unmet_resources(cfg.scaling, cluster_capacity()):  # else Ray waits for them forever
        raise RunFailed(problem)
    scaling = RayScaling(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                               **({"GPU": 1} if cfg.scaling.use_gpu else {})})
    with fenced(fence):
        forget_ray_snapshot(cfg)
    lease = (fence.location, fence.token) if fence is not None else None
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "secrets": job_secrets(), "verbose": verbose,
                           "lease": lease},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(name=cfg.name, storage_path=cfg.run_root,
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),  # rank 0 prunes
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )
    try:
        if driver_follows(cfg):
            with follow_records(cfg.run_dir / "metrics.jsonl", ProgressConsole(task_for(cfg).unit)), \
                    follow_worker_log(cfg.run_dir / WORKER_LOG):
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
        summary["checkpoint"] = result.checkpoint.path if not cfg.run_url else f"{cfg.run_url}/checkpoints/" \
            f"{Path(result.checkpoint.path).name}"
    return summary
