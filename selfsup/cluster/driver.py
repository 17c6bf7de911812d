"""The one way to train: :func:`pretrain` takes a config and where to run it (Ray Train, on this
machine or the cluster at an address, or this process) and returns the run's summary. The command
line, ``selfsup.pretrain``, ``selfsup submit``'s job and the benchmarks all come in here.

What it does, once: refuse W&B online without credentials and folders it cannot write; hold the run's
lease (a second driver of the same run is refused, every write passes its fence); refuse data that can
never train (pre-flight); with ``restart`` set the old run aside; refuse resuming checkpoints trained
with another config (``RESUMABLE_KEYS`` aside) and, here, a GPU torch cannot see; then train here
(:mod:`selfsup.cluster.in_process`) or under Ray (:mod:`selfsup.cluster.ray_driver`). Where the run
resumes from is decided by :func:`selfsup.core.checkpoint.decide_resume`, in either. Heavy libraries
load only once the lease is held.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import yaml

from selfsup.config import ConfigError, ExperimentConfig, config_differences, load_config, override_text, parse_config
from selfsup.core.fence import fenced
from selfsup.errors import RunFailed
from selfsup.train.lease import LEASE, Fence, run_lease

SHOWN_CHANGES = 4  # a refused resume names this many changed keys, then a count

log = logging.getLogger("selfsup.cluster")
notes = logging.getLogger("selfsup.note")  # the console says these as `selfsup: note: ...`


def pretrain(cfg: ExperimentConfig, use_ray: bool = True, address: str | None = None, restart: bool = False) -> dict:
    """Train ``cfg`` under Ray Train (a Ray of its own, or the cluster at ``address`` / RAY_ADDRESS), or
    in this process when not ``use_ray``; returns the summary (also in ``<run>/summary.json``). The run
    resumes from its latest good checkpoint; ``restart`` sets the old run aside (``<run>.old-<time>``)
    and starts afresh. Ctrl-C raises :class:`Interrupted`; what cannot run, a ``OneLineError``."""
    from selfsup.tracking.wandb_run import check_credentials

    check_credentials(cfg.tracking.mode)
    check_writable(cfg, use_ray, address)
    try:
        with run_lease(cfg) as lease:  # taken before torch loads, so that a second driver is refused at once
            return _drive(cfg, use_ray, address, restart, lease.fence)
    except KeyboardInterrupt:
        raise Interrupted(cfg) from None


def _drive(cfg: ExperimentConfig, use_ray: bool, address: str | None, restart: bool, fence: Fence) -> dict:
    """:func:`pretrain` once it holds the run's lease (``fence``, its writes' fence)."""
    preflight(cfg, use_ray)
    if restart:
        with fenced(fence):
            set_aside(cfg)
    refuse_changed_config(cfg)
    if use_ray:
        from selfsup.cluster import ray_driver

        return ray_driver.train_under_ray(cfg, address, fence)
    check_gpu_here(cfg)
    from selfsup.cluster import in_process
    from selfsup.tasks import task_for
    from selfsup.train.console import ProgressConsole

    return in_process.train_here(cfg, [ProgressConsole(task_for(cfg).unit)], fence)


def done_line(summary: dict) -> str:
    """What a finished pretraining says: steps, where the final weights are, bad samples, epochs and time."""
    return (
        f"done: {summary['steps']} steps, final weights in {summary['checkpoint']}, "
        f"{summary['data']['skipped']} bad samples skipped ({summary['epochs']:.2f} epochs in "
        f"{summary['train_seconds'] / 60:.1f} min)"
    )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the pretraining of the run ``cfg`` (the command line names its last checkpoint)."""

    def __init__(self, cfg):
        super().__init__(cfg.name)
        self.cfg = cfg


def check_writable(cfg: ExperimentConfig, use_ray: bool, address: str | None) -> None:
    """Refuse, before any work, a run whose folders cannot be written: the run folder, W&B's, and
    ``~/.ray`` for a Ray of its own (its token and settings). One line naming the folder and the fix."""
    from selfsup.core.storage import require_writable
    from selfsup.tracking.wandb_run import check_folders

    require_writable(
        cfg.run_dir,
        "pretrain writes the run there (its lease, checkpoints, metrics): make it "
        "writable, or set run_root to another folder",
    )
    check_folders(cfg.tracking.mode, cfg.run_dir)
    if use_ray and not (address or os.environ.get("RAY_ADDRESS")):
        require_writable(
            Path.home() / ".ray",
            "a Ray of its own writes its token and settings there: set HOME to a writable folder, or pass --no-ray",
        )


def trained_config(cfg: ExperimentConfig) -> tuple[str, ExperimentConfig] | None:
    """Where the run's latest complete checkpoint is and the config it was trained with (its
    ``config.yaml``, the only file read from a bucket); None before the first checkpoint."""
    if not cfg.run_url:
        from selfsup.core.checkpoint import list_checkpoints

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
    old = ", ".join(f"{k}={override_text(v[0])}" for k, v in shown)
    new = (
        override_text(shown[0][1][1])
        if len(changed) == 1
        else ", ".join(f"{k}={override_text(v[1])}" for k, v in shown)
    )
    run = cfg.run_url or str(cfg.run_dir)
    afresh = (
        "pick another name=... to start afresh"
        if cfg.run_url
        else f"pass --restart to start afresh (the old run is kept as {run}.old-<time>)"
    )
    raise RunFailed(
        f"{run} has checkpoints trained with {old}{more}; this config says {new}. Resume with the "
        f"same config, or {afresh}"
    )


def set_aside(cfg: ExperimentConfig) -> Path | None:
    """``--restart``: move everything in the run folder but the lease (which this driver holds) into
    ``<run>.old-<time>`` beside it; nothing is deleted. Returns that folder, None when there was nothing."""
    if cfg.run_url:
        raise RunFailed(
            f"--restart keeps the old run aside, which only works for a local run_root; for "
            f"{cfg.run_url} pick another name=..., or delete that prefix first"
        )
    run = Path(cfg.run_dir)
    if run.name in ("", ".", "..") or run.parent.resolve() != Path(cfg.run_root).resolve():
        raise RunFailed(
            f"--restart sets aside only a run folder inside run_root, and {run} is not one: "
            "set name=... to a plain folder name"
        )
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
        raise RunFailed(
            f"scaling.use_gpu=true but torch sees no CUDA GPU here (torch {torch.__version__}, "
            f"{built}): set scaling.use_gpu=false, or run where a GPU is visible"
        )


def preflight(cfg: ExperimentConfig, use_ray: bool) -> None:
    """Refuse data that can never train ``cfg`` (:class:`DataProblem`, before Ray starts) and say once
    what the config converts. Under Ray the batch is checked against the most workers it may get."""
    from selfsup.data.preflight import check_data

    workers = cfg.scaling.num_workers if use_ray else 1
    for line in check_data(cfg, max(workers) if isinstance(workers, tuple) else workers):
        notes.info(line)
