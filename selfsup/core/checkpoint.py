"""Checkpoint directories: written atomically, read with ``torch.load(weights_only=True)``.

``<run>/checkpoints/samples-000000012800/`` holds ``model.pt`` (the method's state dict),
``state.pt`` (optimiser, position, RNG states), ``config.yaml``, ``metrics.json`` and, written last,
``progress.json``: the write order (``seq``), the samples seen (the name: a count that does not
depend on the world size), the step, epoch and world size, and the size of every other file. A
checkpoint is complete when ``progress.json`` lists files that are all there at their sizes;
"latest" is the complete one written last, and pruning drops the earliest written, never by name.
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

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
SPACE_MARGIN = 1.25  # free space wanted before a write, times the size of the last checkpoint


class CheckpointError(ValueError):
    """A path that is not a readable selfsup checkpoint."""


class CheckpointSpaceError(OSError):
    """Not enough free space for the next checkpoint (retrying cannot help)."""


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


def checkpoint_name(samples_seen: int) -> str:
    """The directory name of the checkpoint after ``samples_seen`` training samples (all ranks together)."""
    return f"samples-{samples_seen:012d}"


def write_checkpoint(dest: Path, model_state: dict, train_state: dict, cfg: ExperimentConfig, metrics: dict,
                     progress: dict) -> Path:
    """Write a checkpoint's files into the new directory ``dest``, ``progress.json`` (with the other
    files' sizes) last; every file is fsynced. A full disk becomes :class:`CheckpointSpaceError`."""
    dest.mkdir(parents=True)
    try:
        torch.save(model_state, dest / "model.pt")
        torch.save(train_state, dest / "state.pt")
        (dest / "config.yaml").write_text(dump_config(cfg))
        (dest / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
        sizes = {f.name: f.stat().st_size for f in sorted(dest.iterdir())}
        (dest / PROGRESS).write_text(json.dumps({**progress, "files": sizes}, indent=1))
        for f in dest.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, RuntimeError) as err:  # torch.save reports ENOSPC as "basic_ios::clear: iostream error"
        shutil.rmtree(dest, ignore_errors=True)
        free = shutil.disk_usage(dest.parent).free
        if isinstance(err, OSError) and err.errno == 28 or free < 64 << 20:
            raise CheckpointSpaceError(f"no space left for a checkpoint in {dest.parent} ({free / 2**20:.0f} MiB "
                                       "free); free some space or set run_root elsewhere") from None
        raise
    return dest


def checkpoint_bytes(path: Path) -> int:
    """The size of a complete checkpoint's files, from its ``progress.json``."""
    return sum(read_progress(path).get("files", {}).values())


def ensure_space(root: Path, needed: int) -> None:
    """Raise :class:`CheckpointSpaceError` naming ``root`` unless ``needed`` bytes (times a margin) are free."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < needed * SPACE_MARGIN:
        raise CheckpointSpaceError(f"not enough space for the next checkpoint in {root}: it needs about "
                                   f"{needed * SPACE_MARGIN / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free "
                                   "some space or set run_root elsewhere")


def remove_partial(root: Path) -> list[Path]:
    """Delete the ``.tmp-*`` directories that interrupted writes left in ``root``; returns them."""
    found = sorted(Path(root).glob(".tmp-*")) if Path(root).is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def save_checkpoint(run_dir: Path, model_state: dict, train_state: dict, cfg: ExperimentConfig, metrics: dict,
                    progress: dict, keep: int) -> Path:
    """Write ``<run>/checkpoints/samples-N`` atomically (temp dir, then rename), after checking the free
    space against the last checkpoint's size; keep the ``keep`` written last. With an object-store
    ``run_root`` the checkpoint is then pushed to the bucket."""
    root = Path(run_dir) / CHECKPOINTS
    previous = list_checkpoints(run_dir)
    ensure_space(root, checkpoint_bytes(previous[-1]) if previous else 0)
    final = root / checkpoint_name(progress["samples_seen"])
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, model_state, train_state, cfg, metrics, progress)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if cfg.run_url:  # object storage: the files, progress.json last; then metrics and the W&B id
        from selfsup.core.storage import push_checkpoint, push_run_files

        push_checkpoint(final, cfg.run_url, keep)
        push_run_files(run_dir, cfg.run_url)
    return final


def remove_after(run_dir: Path, samples_seen: int, remote: str | None = None) -> list[str]:
    """Delete the run's checkpoints past ``samples_seen``, complete or not (in its bucket when
    ``remote``); returns their names. Resuming at ``samples_seen``, these are the work of an attempt
    that stopped before Ray took them: left, they would pass for the latest and outlive pruning."""
    def past(name: str) -> bool:
        return name.startswith("samples-") and name[8:].isdigit() and int(name[8:]) > samples_seen

    if remote:
        from selfsup.core.storage import checkpoint_names, delete_checkpoint

        found = [n for n in checkpoint_names(remote) if past(n)]
        for name in found:
            delete_checkpoint(remote, name)
        return found
    root = Path(run_dir) / CHECKPOINTS
    found = sorted(p.name for p in root.iterdir() if past(p.name)) if root.is_dir() else []
    for name in found:
        shutil.rmtree(root / name, ignore_errors=True)
    return found


def read_progress(path: Path) -> dict:
    """A checkpoint's ``progress.json`` ({} when missing or unreadable)."""
    try:
        return json.loads((Path(path) / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}


def is_complete(path: Path) -> bool:
    """Whether every file ``progress.json`` lists is there at its size."""
    files = read_progress(path).get("files")
    if not files:
        return False
    try:
        return all((Path(path) / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, in the order they were written."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)]
    return sorted(found, key=lambda p: read_progress(p)["seq"])


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was written at (from its ``progress.json``)."""
    progress = read_progress(path)
    if "step" not in progress:
        raise CheckpointError(f"{path}: not a complete checkpoint (no readable {PROGRESS})")
    return int(progress["step"])


def latest_checkpoint(run_dir: Path, remote: str | None = None) -> Path | None:
    """The complete checkpoint written last; with ``remote`` (the run's URL) the bucket's is pulled first."""
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
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run {path} has no complete checkpoint yet")
        return latest
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete selfsup checkpoint (needs {PROGRESS} and the files it lists)")
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
