"""Weights & Biases tracking: offline under the run folder by default, online with credentials.

Each pretraining run is one W&B run (job type "pretrain"): its id is kept in ``<run>/wandb_id`` so a
resumed run (after a failure, or a re-run of the same name) continues the same W&B run. Each
``selfsup eval`` is a W&B run of its own (job type "eval") in the same group, ``tracking.group``
(default: the run's name), so it never writes into the training run's history. An offline run
ends with the ``wandb sync`` command that uploads it.
"""

from __future__ import annotations

import logging
import os
import shlex
import uuid
from pathlib import Path
from typing import Any

from selfsup.config import ExperimentConfig, load_config
from selfsup.core.storage import require_writable
from selfsup.errors import OneLineError

log = logging.getLogger("selfsup.tracking")

SECRET_MARKERS = ("key", "token", "secret", "password")


class TrackingError(OneLineError, RuntimeError):
    """W&B cannot be used as the config asks (online without credentials); the message says what to do."""


def scrub(tree):
    """A copy of a config tree without values whose key names a secret."""
    if isinstance(tree, dict):
        return {k: scrub(v) for k, v in tree.items() if not any(m in str(k).lower() for m in SECRET_MARKERS)}
    if isinstance(tree, list):
        return [scrub(v) for v in tree]
    return tree


def run_id(run_dir: Path) -> str:
    """The run's W&B id, created once and kept in ``<run>/wandb_id``."""
    path = Path(run_dir) / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    rid = uuid.uuid4().hex[:12]
    path.write_text(rid)
    return rid


def check_credentials(mode: str) -> None:
    """Refuse ``tracking.mode=online`` when wandb finds no credentials (``WANDB_API_KEY``, a
    ``wandb login`` entry in the netrc, an identity token file); looked up without the network."""
    if mode != "online":
        return
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    host = wandb_setup.singleton().settings.base_url
    try:
        auth = wbauth.authenticate_session(host=host, source="selfsup", prompt=False, update_session=False)
    except AuthenticationError as err:
        raise TrackingError(f"tracking.mode=online: {err}; set a valid WANDB_API_KEY or run `wandb login`") from None
    if auth is None:
        raise TrackingError(
            f"tracking.mode=online needs W&B credentials for {host}: set WANDB_API_KEY or run "
            "`wandb login` (or use tracking.mode=offline and `wandb sync` later)"
        )


def check_folders(mode: str, run_dir: Path) -> None:
    """Refuse, before any work, a W&B run (``mode`` not "disabled") that could not write its files:
    the run folder, and wandb's settings, cache and data folders (under HOME unless their variables
    name others). Raises FolderNotWritable naming the folder and the variable that moves it."""
    if mode == "disabled":
        return
    from wandb import env

    stay = f"or set tracking.mode=disabled (W&B writes there with tracking.mode={mode})"
    require_writable(run_dir, f"make it writable, {stay}")
    for var, folder in (
        (env.CONFIG_DIR, os.environ.get(env.CONFIG_DIR) or Path.home() / ".config" / "wandb"),
        (env.CACHE_DIR, env.get_cache_dir()),
        (env.DATA_DIR, env.get_data_dir()),
    ):
        require_writable(folder, f"set {var} to a writable folder, {stay}")


def start_run(
    cfg: ExperimentConfig, job_type: str, run_dir: Path, resume_id: str | None = None, name: str | None = None
):
    """A W&B run of ``cfg`` in its ``tracking.mode`` ("offline" or "online"), written under
    ``run_dir``/wandb, in the group ``tracking.group`` (default: the run's name) with ``tracking.tags``;
    the run ``resume_id`` continued when given, else a new one."""
    check_credentials(cfg.tracking.mode)
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    t = cfg.tracking
    return wandb.init(
        project=t.project,
        entity=t.entity,
        name=name or cfg.name,
        id=resume_id,
        resume="allow" if resume_id else None,
        dir=str(run_dir),
        mode=t.mode,
        group=t.group or cfg.name,
        tags=t.tags,
        job_type=job_type,
        config=scrub(cfg.model_dump(mode="json")),
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )


def finish_run(run) -> None:
    """Close ``run``; when it is offline, print its folder and the command that uploads it."""
    folder, offline = run.settings.sync_dir, run.offline
    run.finish()
    if offline:
        print(f"W&B run saved offline in {folder}; upload it with: wandb sync {shlex.quote(str(folder))}", flush=True)


def check_eval_tracking(checkpoint: str | Path) -> None:
    """Refuse now, before evaluating, a checkpoint whose run logs to W&B online without credentials, or
    to W&B in folders it cannot write (:func:`check_folders`)."""
    from selfsup.core.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    mode = load_config(ckpt / "config.yaml").tracking.mode
    check_credentials(mode)
    check_folders(mode, ckpt.parent.parent)


def log_eval_report(report: dict, out: str | Path) -> None:
    """An evaluation report (``selfsup.eval.run.evaluate``'s, written in ``out``) as a new W&B run, job
    type "eval", in the group of its checkpoint's run, unless that run's ``tracking.mode`` is
    "disabled": ``eval/<encoder>/<metric>`` against ``eval/step`` (the checkpoint's step), the
    scores and per-class tables and the report's PNGs."""
    import wandb

    from selfsup.core.checkpoint import checkpoint_step

    ckpt = Path(report["details"]["checkpoint_path"])
    cfg = load_config(ckpt / "config.yaml")
    if cfg.tracking.mode == "disabled":
        return
    if ckpt.parent.name != "checkpoints":
        log.info("W&B: %s is not inside a run's checkpoints/ folder; not logged", ckpt)
        return
    run = start_run(cfg, "eval", ckpt.parent.parent, name=f"{cfg.name}-eval-{ckpt.name}")
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    encoders, out = report["encoders"], Path(out)
    metrics = list(dict.fromkeys(m for values in encoders.values() for m in values))
    record = {f"eval/{name}/{m}": v for name, values in encoders.items() for m, v in values.items()}
    record |= {
        f"eval/{key}": wandb.Image(str(out / name)) for key, name in report["files"].items() if name.endswith(".png")
    }
    record["eval/scores"] = wandb.Table(
        columns=["encoder", *metrics],
        data=[[name, *[values.get(m) for m in metrics]] for name, values in encoders.items()],
    )
    if per_class := report["details"].get("per_class"):
        record["eval/per_class"] = wandb.Table(columns=list(per_class[0]), data=[list(r.values()) for r in per_class])
    run.log({"eval/step": checkpoint_step(ckpt), **record})
    run.summary.update(
        {"eval/checkpoint": str(ckpt), "eval/linear_hparams": report["details"]["checkpoint"]["linear_hparams"]}
    )
    finish_run(run)


class WandbReporter:
    """Reporter sink (``selfsup.core.reporter``) for the W&B run of rank 0, resumed by the id in
    ``<run>/wandb_id``. It starts at ``start``, once the Trainer is set up, so a run refused for its
    config, data or checkpoint leaves no W&B run. Records go under ``train/`` (unless already
    namespaced, like ``monitor/…``); with ``tracking.log_checkpoints`` each checkpoint is a "model"
    artifact named after the run (aliases "latest" and the checkpoint's name, ``samples-N``); at
    the end the summary, then the run is closed."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.run: Any = None  # a wandb Run once started

    def start(self) -> None:
        self.run = start_run(self.cfg, "pretrain", self.cfg.run_dir, resume_id=run_id(self.cfg.run_dir))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k if "/" in k else f"train/{k}": v for k, v in metrics.items()}, step=step)

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None:
        if path is None or not self.cfg.tracking.log_checkpoints:
            return
        import wandb

        artifact = wandb.Artifact(self.cfg.name, type="model", metadata={"step": step, **metrics})
        artifact.add_dir(str(path))  # copied into W&B's staging folder now: the run may prune the checkpoint
        self.run.log_artifact(artifact, aliases=["latest", Path(path).name])

    def finish(self, summary: dict) -> None:
        self.run.summary.update({"steps": summary["steps"], "skipped_samples": summary["data"]["skipped"]})
        finish_run(self.run)
