"""Weights & Biases tracking: offline under the run folder by default, online with a key.

One W&B run per selfsup run: its id is kept in ``<run>/wandb_id`` so a resumed run (after a
failure, or a re-run of the same name) continues the same W&B run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

SECRET_MARKERS = ("key", "token", "secret", "password")


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


def start_run(run_dir: Path, name: str, mode: str, project: str, entity: str | None, config: dict, job_type: str):
    """A W&B run in ``mode`` ("offline", "online"), resumed by id; None when ``mode`` is "disabled"."""
    if mode == "disabled":
        return None
    import wandb

    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise RuntimeError("tracking.mode=online needs WANDB_API_KEY in the environment "
                           "(or use tracking.mode=offline and `wandb sync` later)")
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project, entity=entity, name=name, id=run_id(run_dir), dir=str(run_dir),
                      mode=mode, resume="allow", config=scrub(config), job_type=job_type,
                      settings=wandb.Settings(console="off", x_disable_stats=True))


class WandbReporter:
    """A Reporter that forwards metrics to W&B on rank 0 and to an inner reporter on every rank."""

    def __init__(self, inner, run):
        self.inner, self.run = inner, run

    def log(self, step: int, metrics: dict) -> None:
        self.inner.log(step, metrics)
        if self.run is not None:
            self.run.log({k if "/" in k else f"train/{k}": v for k, v in metrics.items()}, step=step)

    def checkpoint(self, step: int, path: Path) -> None:
        self.inner.checkpoint(step, path)

    def finish(self, summary: dict) -> None:
        self.inner.finish(summary)
        if self.run is not None:
            self.run.summary.update({"steps": summary["steps"], "skipped_samples": summary["data"]["skipped"]})
            self.run.finish()
