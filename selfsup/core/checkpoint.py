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

This module owns the format: :class:`TrainState` is ``state.pt``, :class:`CheckpointProgress` is
``progress.json`` (both derived from the one ``TrainState``), :class:`CheckpointWriter` is the one
writer (the run folder, a staging folder Ray persists, and the run's bucket after the run folder), and
:func:`decide_resume` is the one rule for where a run resumes from.

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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import cast

import numpy as np
import torch
import xxhash

from selfsup.config import ConfigError, ExperimentConfig, dump_config, load_config
from selfsup.core.distributed import rank, world_size
from selfsup.core.fence import Fence, fenced
from selfsup.errors import OneLineError

log = logging.getLogger("selfsup.checkpoint")
CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt"  # <run>/corrupt/<name>: checkpoints that failed their digests, kept for inspection
PROGRESS = "progress.json"
DIGEST = "xxh3_128"  # progress.json's key of the files' digests
SPACE_MARGIN = 1.25  # free space wanted before a write, times the size of the last checkpoint


class CheckpointError(OneLineError, ValueError):
    """A path that is not a readable selfsup checkpoint."""


class CheckpointCorrupt(CheckpointError):
    """A complete checkpoint whose file does not match the digest ``progress.json`` lists."""


class CheckpointSpaceError(OneLineError, OSError):
    """Not enough free space for the run's next write: a checkpoint or a record (retrying cannot help)."""


@dataclass
class TrainState:
    """``state.pt``: what the loop needs to go on exactly where it stopped. Stored as a plain dict of
    tensors and numbers (``torch.load(weights_only=True)`` reads it); ``rng`` holds one entry per rank."""

    optimizer: dict
    step: int
    epoch: int
    step_in_epoch: int
    samples_seen: int
    checkpoints_written: int
    rng: list
    sized_total_steps: int = 0  # the total steps a time budget fixed (0: not sized)
    train_seconds: float = 0.0  # wall time of every attempt so far

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: it would copy every tensor

    @classmethod
    def from_dict(cls, state: dict, where: Path | str = "state.pt") -> TrainState:
        """The record of a loaded ``state.pt`` (keys it does not know, such as old ``data_health``, ignored)."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in state.items() if k in known})
        except TypeError as err:
            raise CheckpointError(f"{where}: not a selfsup training state ({err})") from None

    def progress(self) -> CheckpointProgress:
        """The ``progress.json`` of a checkpoint of this state."""
        return CheckpointProgress(
            seq=self.checkpoints_written,
            samples_seen=self.samples_seen,
            step=self.step,
            epoch=self.epoch,
            step_in_epoch=self.step_in_epoch,
            world_size=len(self.rng),
        )


@dataclass(frozen=True)
class CheckpointProgress:
    """``progress.json``, written last: the write order (``seq``), the samples seen by all ranks (the
    name), step, epoch and world size; ``files`` and ``digests`` (file name -> size, xxh3-128) are
    filled in by the writer."""

    samples_seen: int
    seq: int = 0  # 0: a stand-in written by hand (list_checkpoints orders only those with a seq)
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    world_size: int = 1
    files: dict = field(default_factory=dict)
    digests: dict | None = None  # None: written before checkpoints recorded digests

    def to_json(self) -> str:
        tree = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "digests"}
        return json.dumps({**tree, DIGEST: self.digests}, indent=1)

    @classmethod
    def read(cls, path: Path) -> CheckpointProgress | None:
        """The ``progress.json`` of the checkpoint at ``path``; None when missing or unreadable."""
        tree = read_progress(path)
        if "samples_seen" not in tree:
            return None
        known = {f.name for f in fields(cls)} - {"digests"}
        return cls(**{k: v for k, v in tree.items() if k in known}, digests=tree.get(DIGEST))


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
    np_state = cast(tuple, np.random.get_state())  # legacy=True: ("MT19937", keys, pos, ...)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }
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


def write_checkpoint(dest: Path, model_state: dict, state: TrainState, cfg: ExperimentConfig, metrics: dict) -> Path:
    """Write a checkpoint's files into the new directory ``dest``, ``progress.json`` (with the other
    files' sizes and digests) last; every file is fsynced. Each file is hashed (read back from
    the page cache) and synced in a thread while the next is serialised. A full disk becomes
    :class:`CheckpointSpaceError`."""
    dest.mkdir(parents=True)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            done = {}
            for name, write in (
                ("model.pt", lambda f: torch.save(model_state, f)),
                ("state.pt", lambda f: torch.save(state.to_dict(), f)),
                ("config.yaml", lambda f: f.write_text(dump_config(cfg))),
                ("metrics.json", lambda f: f.write_text(json.dumps(metrics, indent=1, default=float))),
            ):
                write(dest / name)
                done[name] = pool.submit(_digest_and_sync, dest / name)
            digests = {name: future.result() for name, future in sorted(done.items())}
        sizes = {name: (dest / name).stat().st_size for name in digests}
        (dest / PROGRESS).write_text(
            CheckpointProgress(**{**state.progress().__dict__, "files": sizes, "digests": digests}).to_json()
        )
        _digest_and_sync(dest / PROGRESS)
    except (OSError, RuntimeError) as err:  # torch.save reports ENOSPC as "basic_ios::clear: iostream error"
        shutil.rmtree(dest, ignore_errors=True)
        free = shutil.disk_usage(dest.parent).free
        if isinstance(err, OSError) and err.errno == 28 or free < 64 << 20:
            raise CheckpointSpaceError(
                f"no space left for a checkpoint in {dest.parent} ({free / 2**20:.0f} MiB "
                "free); free some space or set run_root elsewhere"
            ) from None
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
        raise CheckpointSpaceError(
            f"not enough space for the next checkpoint in {root}: it needs about "
            f"{needed * SPACE_MARGIN / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free "
            "some space or set run_root elsewhere"
        )


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
                log.warning(
                    "%s: its files are not at the sizes %s lists; moved to %s for inspection",
                    p,
                    PROGRESS,
                    move_aside(p),
                )
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


def prune_checkpoints(run_dir: Path, keep: int, fence: Fence | None = None) -> list[str]:
    """Delete all but the ``keep`` complete checkpoints written last (under ``fence``); returns their names."""
    old = list_checkpoints(run_dir)[:-keep]
    with fenced(fence):
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in old]


@dataclass(frozen=True)
class CheckpointWriter:
    """The one writer of a run's checkpoints (rank 0 calls it). Without ``staging``: into
    ``<run_dir>/checkpoints/samples-N`` atomically (a temp dir, then a rename under ``fence``), after
    checking the free space against the last checkpoint's size, pruned to the ``keep`` written last,
    then pushed to the run's bucket ``run_url`` when it has one. With ``staging`` (Ray): into that
    folder, which Ray's checkpoint storage persists into the run folder or bucket (Ray's sink prunes)."""

    run_dir: Path
    keep: int
    run_url: str | None = None
    fence: Fence | None = None
    staging: Path | None = None

    @classmethod
    def for_run(
        cls, cfg: ExperimentConfig, fence: Fence | None = None, staging: Path | None = None
    ) -> CheckpointWriter:
        return cls(Path(cfg.run_dir), cfg.train.keep_checkpoints, cfg.run_url, fence, staging)

    def write(
        self, model_state: dict, state: TrainState, cfg: ExperimentConfig, metrics: dict, size_estimate: int = 0
    ) -> Path:
        """The checkpoint of ``state``; ``size_estimate`` (bytes) is the space a staged one needs in the run folder."""
        name = checkpoint_name(state.samples_seen)
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)  # the last one: Ray's storage holds it now
            if not self.run_url:  # Ray persists into the run folder: it needs the space there
                ensure_space(self.run_dir / CHECKPOINTS, size_estimate)
            return write_checkpoint(self.staging / name, model_state, state, cfg, metrics)
        root = self.run_dir / CHECKPOINTS
        previous = list_checkpoints(self.run_dir)
        ensure_space(root, checkpoint_bytes(previous[-1]) if previous else 0)
        final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_checkpoint(tmp, model_state, state, cfg, metrics)
        except OSError:
            if self.fence is not None:  # the new driver may have removed this one's temp dir: say that instead
                self.fence.check()
            raise
        with fenced(self.fence):
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        prune_checkpoints(self.run_dir, self.keep, self.fence)
        if self.run_url:  # object storage: the files, progress.json last; then metrics and the W&B id
            from selfsup.core.storage import push_checkpoint, push_run_files

            with fenced(self.fence):
                push_checkpoint(final, self.run_url, self.keep)
            with fenced(self.fence):
                push_run_files(self.run_dir, self.run_url)
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
            raise CheckpointCorrupt(f"{Path(path) / name} does not match its digest in {PROGRESS}: the file is damaged")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, in the order they were written (one pruned meanwhile is left out)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = {
        p: read_progress(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)
    }
    return sorted((p for p, progress in found.items() if "seq" in progress), key=lambda p: found[p]["seq"])


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was written at (from its ``progress.json``)."""
    progress = CheckpointProgress.read(path)
    if progress is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (no readable {PROGRESS})")
    return progress.step


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint written last (not verified: :func:`decide_resume` verifies)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


@dataclass(frozen=True)
class Resume:
    """Where a run resumes from and why: ``checkpoint`` None starts afresh; ``samples_seen`` is its
    position (records past it are redone); ``reason`` says which checkpoint and what was passed over."""

    checkpoint: Path | None
    samples_seen: int
    reason: str


def decide_resume(run_dir: Path, remote: str | None = None, fence: Fence | None = None) -> Resume:
    """The one rule for where a run resumes: the complete checkpoint written last whose digests hold
    (with ``remote``, the run's URL, the bucket's, pulled into ``run_dir``), whatever Ray's bookkeeping
    says. Rank 0 decides; with several ranks the others take its decision (and pull the checkpoint
    from a bucket). Each damaged checkpoint is named in one line and moved to ``<run>/corrupt`` (in the
    bucket too) under ``fence``; one pruned between listing and reading is passed over."""
    decision = [_decide_here(Path(run_dir), remote, fence) if rank() == 0 else None]
    if world_size() > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(decision)
    resume = decision[0]
    assert resume is not None  # rank 0's, broadcast
    if world_size() > 1 and remote and rank() != 0 and resume.checkpoint is not None:
        from selfsup.core.storage import pull_checkpoint

        pull_checkpoint(remote, resume.checkpoint.name, run_dir)
    return resume


def _decide_here(run_dir: Path, remote: str | None, fence: Fence | None) -> Resume:
    from selfsup.core import storage

    names = storage.remote_checkpoints(remote) if remote else [p.name for p in list_checkpoints(run_dir)]
    passed = []
    for name in reversed(names):
        path = run_dir / CHECKPOINTS / name
        try:
            if remote:
                storage.pull_checkpoint(remote, name, run_dir)
            verify_checkpoint(path)
            progress = CheckpointProgress.read(path)
            if progress is None:
                raise CheckpointError(f"{path}: {PROGRESS} went missing")
        except CheckpointCorrupt as err:
            with fenced(fence):
                kept = move_aside(path)
                if remote:
                    storage.move_aside(remote, name)
            log.warning("%s; resuming from the checkpoint before it (this one is kept in %s)", err, kept)
            passed.append(f"{name} damaged, kept in {kept}")
            continue
        except (CheckpointError, FileNotFoundError):
            log.info("%s was removed while being read (pruned); trying the one before it", path)
            passed.append(f"{name} pruned while read")
            continue
        why = f"resuming from {path} (step {progress.step}), the latest good checkpoint"
        return Resume(path, progress.samples_seen, why + (f"; passed over: {'; '.join(passed)}" if passed else ""))
    why = (
        "no complete checkpoint yet: starting afresh"
        if not passed
        else f"no good checkpoint left ({'; '.join(passed)}): starting afresh"
    )
    return Resume(None, 0, why)


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


def load_checkpoint(path: str | Path, with_state: bool = False) -> tuple[ExperimentConfig, dict, TrainState | None]:
    """(config, model state dict, training state or None), the files read checked against their
    digests first; refuses anything but plain tensors and data, and a damaged file in one line."""
    path = resolve_checkpoint(path)
    try:
        verify_checkpoint(path, ("config.yaml", "model.pt", *(("state.pt",) if with_state else ())))
        cfg = load_config(path / "config.yaml")
        model = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        state = (
            TrainState.from_dict(
                torch.load(path / "state.pt", map_location="cpu", weights_only=True), path / "state.pt"
            )
            if with_state
            else None
        )
    except CheckpointCorrupt as err:
        names = [p.name for p in list_checkpoints(path.parent.parent)]
        earlier = [path.parent / n for n in names[: names.index(path.name) if path.name in names else None]][-1:]
        raise CheckpointCorrupt(f"{err}; use an earlier checkpoint{f' ({earlier[0]})' if earlier else ''}") from None
    except (CheckpointError, ConfigError):
        raise
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} was removed while being read (pruned by its run?); pick a later one, or "
            "pass the run folder for its latest"
        ) from None
    except Exception as err:  # pickle payloads and damaged files both land here
        raise CheckpointError(
            f"{path}: cannot load safely ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    return cfg, model, state
