"""Weights & Biases tracking: offline under the run folder by default, online with a key.

One W&B run per selfsup run: its id is kept in ``<run>/wandb_id`` so a resumed run (after a
failure, or a re-run of the same name) continues the same W&B run.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from selfsup.config import load_config
from selfsup.core.checkpoint import checkpoint_step

log = logging.getLogger("selfsup.tracking")

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


def log_eval_report(report: dict, out: str | Path) -> None:
    """An evaluation report (``selfsup.eval.run.evaluate``'s, written in ``out``) to the W&B run of its
    checkpoint's run (resumed by id, job_type "eval"), unless that run's ``tracking.mode`` is
    "disabled": ``eval/<encoder>/<metric>`` against ``eval/step`` (the checkpoint's step), the
    scores and per-class tables and the report's PNGs."""
    ckpt = Path(report["details"]["checkpoint_path"])
    cfg = load_config(ckpt / "config.yaml")
    if cfg.tracking.mode == "disabled":
        return
    if ckpt.parent.name != "checkpoints":
        log.info("W&B: %s is not inside a run's checkpoints/ folder; not logged", ckpt)
        return
    import wandb

    run = start_run(ckpt.parent.parent, cfg.name, cfg.tracking.mode, cfg.tracking.project, cfg.tracking.entity,
                    cfg.model_dump(mode="json"), job_type="eval")
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    encoders, out = report["encoders"], Path(out)
    metrics = list(dict.fromkeys(m for values in encoders.values() for m in values))
    record = {f"eval/{name}/{m}": v for name, values in encoders.items() for m, v in values.items()}
    record |= {f"eval/{key}": wandb.Image(str(out / name)) for key, name in report["files"].items() if name.endswith(".png")}
    record["eval/scores"] = wandb.Table(columns=["encoder", *metrics],
                                        data=[[name, *[values.get(m) for m in metrics]] for name, values in encoders.items()])
    if per_class := report["details"].get("per_class"):
        record["eval/per_class"] = wandb.Table(columns=list(per_class[0]), data=[list(r.values()) for r in per_class])
    run.log({"eval/step": checkpoint_step(ckpt), **record})
    run.summary.update({"eval/checkpoint": str(ckpt), "eval/linear_hparams": report["details"]["checkpoint"]["linear_hparams"]})
    run.finish()


class WandbReporter:
    """Reporter sink (``selfsup.core.reporter``) for the W&B ``run`` of rank 0: records under ``train/``
    (unless already namespaced, like ``monitor/…``), and at the end the summary, then the run closed."""

    def __init__(self, run):
        self.run = run

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k if "/" in k else f"train/{k}": v for k, v in metrics.items()}, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update({"steps": summary["steps"], "skipped_samples": summary["data"]["skipped"]})
        self.run.finish()
