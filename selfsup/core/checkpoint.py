"""Checkpoint directories: written atomically, verified by digest, read with ``torch.load(weights_only=True)``.

``<run>/checkpoints/samples-000000012800/`` holds ``model.pt`` (the method's state dict),
``state.pt`` (optimiser, position, RNG states), ``config.yaml``, ``metrics.json`` and, written last,
``progress.json``: the write order (``seq``), the samples seen (the name: a count that does not
depend on the world size), the step, epoch and world size, and the size and xxh3-128 digest of every other
file. A checkpoint is complete when ``progress.json`` lists files that are all there at their sizes;
"latest" is the complete one written last, and pruning drops the earliest written, never by name.
Loading checks the digests of the files it reads (``torch.load`` checks no CRC): a damaged file is
refused in one line; a resume skips it for the previous good checkpoint and moves it to
``<run>/corrupt/`` for inspection.

A write into the run takes a ``fence`` (``selfsup.train.lease.Fence``, or None when no lease is
held): the rename and the prune happen only while its driver holds the run's lease.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xxhash

from selfsup.config import ConfigError, ExperimentConfig, dump_config, load_config
from selfsup.core.fence import fenced

log = logging.getLogger("selfsup.checkpoint")
CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt"  # <run>/corrupt/<name>: checkpoints that failed their digests, kept for inspection
PROGRESS = "progress.json"
DIGEST = "xxh3_128"  # progress.json's key of the files' digests
SPACE_MARGIN = 1.25  # free space wanted before a write, times the size of the last checkpoint


class CheckpointError(ValueError):
    """A path that is not a readable selfsup checkpoint."""


class CheckpointCorrupt(CheckpointError):
    """A complete checkpoint whose file does not match the digest ``progress.json`` lists."""


class CheckpointSpaceError(OSError):
    """Not enough free space for the run's next write: a checkpoint or a record (retrying cannot help)."""


def file_digest(path: Path) -> str:
    """The xxh3-128 digest of the file at ``path`` (hex). The digest sits beside the file, so it can
    only catch damage, never tampering: a strong non-cryptographic hash does that, about ten times
    faster than sha256 (``python -m benchmarks.checksums --checkpoint``)."""
    digest, chunk = xxhash.xxh3_128(), bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            digest.update(memoryview(chunk)[:n])
    return digest.hexdigest()


def _digest_and_sync(path: Path) -> str:
    """The digest of the file at ``path``, once it is on disk (fsync)."""
    digest = file_digest(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return digest


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
    files' sizes and digests) last; every file is fsynced. Each file is hashed (read back from
    the page cache) and synced in a thread while the next is serialised. A full disk becomes
    :class:`CheckpointSpaceError`."""
    dest.mkdir(parents=True)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            done = {}
            for name, write in (("model.pt", lambda f: torch.save(model_state, f)),
                                ("state.pt", lambda f: torch.save(train_state, f)),
                                ("config.yaml", lambda f: f.write_text(dump_config(cfg))),
                                ("metrics.json", lambda f: f.write_text(json.dumps(metrics, indent=1, default=float)))):
                write(dest / name)
                done[name] = pool.submit(_digest_and_sync, dest / name)
            digests = {name: future.result() for name, future in sorted(done.items())}
        sizes = {name: (dest / name).stat().st_size for name in digests}
        (dest / PROGRESS).write_text(json.dumps({**progress, "files": sizes, DIGEST: digests}, indent=1))
        _digest_and_sync(dest / PROGRESS)
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


def tidy_checkpoints(run_dir: Path) -> list[str]:
    """Finish what interrupted writes and prunes left in ``<run>/checkpoints``: ``.tmp-*`` directories
    and ``samples-*`` ones with files missing are deleted; one whose files are all there but not at
    their sizes (or whose ``progress.json`` is unreadable) is damaged, and moved to ``<run>/corrupt``.
    Call it only while holding the run's lease. Returns the names it dealt with."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith("samples-") and p.is_dir() and not is_complete(p):
            files = read_progress(p).get("files")
            present = {f.name for f in p.iterdir()}
            if not (p / PROGRESS).exists() or (files and not set(files) <= present) or not present - {PROGRESS}:
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed %s: a write or prune of it was interrupted", p)
            else:
                log.warning("%s: its files are not at the sizes %s lists; moved to %s for inspection", p, PROGRESS,
                            move_aside(p))
        else:
            continue
        found.append(p.name)
    return found


def move_aside(path: Path) -> Path:
    """Move the checkpoint ``path`` into its run's ``corrupt/`` folder (kept, never deleted); returns where."""
    dest = Path(path).parent.parent / CORRUPT / Path(path).name
    if dest.exists():
        dest = dest.with_name(f"{dest.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return dest


def prune_checkpoints(run_dir: Path, keep: int, fence=None) -> list[str]:
    """Delete all but the ``keep`` complete checkpoints written last (under ``fence``); returns their names."""
    old = list_checkpoints(run_dir)[:-keep]
    with fenced(fence):
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in old]


def save_checkpoint(run_dir: Path, model_state: dict, train_state: dict, cfg: ExperimentConfig, metrics: dict,
                    progress: dict, keep: int, fence=None) -> Path:
    """Write ``<run>/checkpoints/samples-N`` atomically (temp dir, then a rename under ``fence``), after
    checking the free space against the last checkpoint's size; keep the ``keep`` written last. With an
    object-store ``run_root`` the checkpoint is then pushed to the bucket."""
    root = Path(run_dir) / CHECKPOINTS
    previous = list_checkpoints(run_dir)
    ensure_space(root, checkpoint_bytes(previous[-1]) if previous else 0)
    final = root / checkpoint_name(progress["samples_seen"])
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_checkpoint(tmp, model_state, train_state, cfg, metrics, progress)
    except OSError:
        if fence is not None:  # the new driver may have removed this one's temp dir: say that instead
            fence.check()
        raise
    with fenced(fence):
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    prune_checkpoints(run_dir, keep, fence)
    if cfg.run_url:  # object storage: the files, progress.json last; then metrics and the W&B id
        from selfsup.core.storage import push_checkpoint, push_run_files

        with fenced(fence):
            push_checkpoint(final, cfg.run_url, keep)
        with fenced(fence):
            push_run_files(run_dir, cfg.run_url)
    return final


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


def verify_checkpoint(path: Path, names: tuple[str, ...] | None = None) -> None:
    """Check the files ``names`` (all it lists when None) of the checkpoint at ``path`` against the
    digests in its ``progress.json``; raise :class:`CheckpointCorrupt` naming the first that
    differs. A checkpoint written before digests were recorded passes, with a warning."""
    progress = read_progress(path)
    if not progress.get("files"):
        raise CheckpointError(f"{path} is not a complete selfsup checkpoint (needs {PROGRESS} and the files it lists)")
    digests = progress.get(DIGEST)
    if digests is None:
        log.warning("%s was written before checkpoints recorded digests: loaded unverified", path)
        return
    for name in names or sorted(digests):
        if name in digests and file_digest(Path(path) / name) != digests[name]:
            raise CheckpointCorrupt(f"{Path(path) / name} does not match its digest in {PROGRESS}: the file "
                                    "is damaged")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, in the order they were written (one pruned meanwhile is left out)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = {p: read_progress(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)}
    return sorted((p for p, progress in found.items() if "seq" in progress), key=lambda p: found[p]["seq"])


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was written at (from its ``progress.json``)."""
    progress = read_progress(path)
    if "step" not in progress:
        raise CheckpointError(f"{path}: not a complete checkpoint (no readable {PROGRESS})")
    return int(progress["step"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint written last (not verified: :func:`resume_point` is)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_point(run_dir: Path, remote: str | None = None, fence=None) -> Path | None:
    """The checkpoint a run resumes from: the complete one written last whose digests hold (with
    ``remote``, the run's URL, the bucket's, pulled into ``run_dir``). Each damaged one is named in one
    line and moved to ``<run>/corrupt`` (in the bucket too) under ``fence``; one pruned between
    listing and reading is passed over. None when no checkpoint is left."""
    from selfsup.core import storage

    names = storage.remote_checkpoints(remote) if remote else [p.name for p in list_checkpoints(run_dir)]
    for name in reversed(names):
        path = Path(run_dir) / CHECKPOINTS / name
        try:
            if remote:
                storage.pull_checkpoint(remote, name, run_dir)
            verify_checkpoint(path)
            return path
        except CheckpointCorrupt as err:
            with fenced(fence):
                kept = move_aside(path)
                if remote:
                    storage.move_aside(remote, name)
            log.warning("%s; resuming from the checkpoint before it (this one is kept in %s)", err, kept)
        except (CheckpointError, FileNotFoundError):
            log.info("%s was removed while being read (pruned); trying the one before it", path)
    return None


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
    """(config, model state dict, training state or None), the files read checked against their
    digests first; refuses anything but plain tensors and data, and a damaged file in one line."""
    path = resolve_checkpoint(path)
    try:
        verify_checkpoint(path, ("config.yaml", "model.pt", *(("state.pt",) if with_state else ())))
        cfg = load_config(path / "config.yaml")
        model = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True) if with_state else None
    except CheckpointCorrupt as err:
        names = [p.name for p in list_checkpoints(path.parent.parent)]
        earlier = [path.parent / n for n in names[:names.index(path.name) if path.name in names else None]][-1:]
        raise CheckpointCorrupt(f"{err}; use an earlier checkpoint{f' ({earlier[0]})' if earlier else ''}") from None
    except (CheckpointError, ConfigError):
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} was removed while being read (pruned by its run?); pick a later one, or "
                              "pass the run folder for its latest") from None
    except Exception as err:  # pickle payloads and damaged files both land here
        raise CheckpointError(f"{path}: cannot load safely ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return cfg, model, state
