"""Checkpoint directories: written atomically, read with ``torch.load(weights_only=True)``.

``<run>/checkpoints/step-00001234/`` holds ``model.pt`` (the method's state dict), ``state.pt``
(optimiser, step, epoch, position in the epoch, RNG states), ``config.yaml`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from selfsup.config import ExperimentConfig, dump_config, load_config


class CheckpointError(ValueError):
    """A path that is not a readable selfsup checkpoint."""


def rng_state() -> dict:
    """Every RNG the loop uses, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model_state: dict, train_state: dict, cfg: ExperimentConfig,
                    metrics: dict, keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp dir, then rename) and keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(model_state, tmp / "model.pt")
    torch.save(train_state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(dump_config(cfg))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if cfg.run_url:  # object storage: files, then the COMPLETE marker; then metrics and the W&B id
        from selfsup.core.storage import push_checkpoint, push_run_files

        push_checkpoint(final, cfg.run_url, keep)
        push_run_files(run_dir, cfg.run_url)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "model.pt").is_file() and (p / "state.pt").is_file())


def checkpoint_step(path: Path) -> int:
    """The training step in a checkpoint directory's name (``step-00001234`` -> 1234)."""
    name = Path(path).name
    if not name.startswith("step-") or not name[5:].isdigit():
        raise CheckpointError(f"{path}: a checkpoint directory is named step-<number>")
    return int(name[5:])


def latest_checkpoint(run_dir: Path, remote: str | None = None) -> Path | None:
    """The newest complete checkpoint; with ``remote`` (the run's URL) the bucket's newest is pulled first."""
    if remote:
        from selfsup.core.storage import pull_latest

        pull_latest(remote, run_dir)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from its own path or from a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run {path} has no complete checkpoint yet")
        return latest
    if not ((path / "model.pt").is_file() and (path / "config.yaml").is_file()):
        raise CheckpointError(f"{path} is not a selfsup checkpoint (needs model.pt and config.yaml)")
    return path


def load_checkpoint(path: str | Path, with_state: bool = False) -> tuple[ExperimentConfig, dict, dict | None]:
    """(config, model state dict, training state or None); refuses anything but plain tensors and data."""
    path = resolve_checkpoint(path)
    cfg = load_config(path / "config.yaml")
    try:
        model = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True) if with_state else None
    except Exception as err:  # pickle payloads and damaged files both land here
        raise CheckpointError(f"{path}: cannot load safely ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return cfg, model, state
