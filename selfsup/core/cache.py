"""A content-addressed cache of computed results under ``$SELFSUP_CACHE`` (``config.cache_root``):
an evaluation's decoded splits and its baselines' scores, each filed under the digest of what
produced it, so that a changed input is a new key and never a stale hit. Entries are written
atomically and read with ``weights_only``; an unreadable entry is a miss, and is written again. A cache
that cannot be written (full, read-only) is one warning, and this process writes no more to it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from selfsup.config import cache_root

log = logging.getLogger("selfsup.cache")
_unwritable: set[str] = set()  # the cache root that failed a write in this process: not tried again


def digest(*parts) -> str:
    """The sha256 hex digest of ``parts`` as sorted-key JSON (dicts, lists, strings, numbers)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def entry_path(kind: str, key: str) -> Path:
    return cache_root() / kind / f"{key}.pt"


def load_cached(kind: str, key: str):
    """The object stored under ``kind``/``key``, or None when there is none (or it cannot be read)."""
    path = entry_path(kind, key)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # a torn or foreign file: recompute and overwrite it
        log.warning("%s: unreadable cache entry (%s); computing it again", path, err)
        return None


def store_cached(kind: str, key: str, value) -> None:
    """Store ``value`` (tensors, numbers, strings, lists and dicts of them) under ``kind``/``key``,
    atomically; a cache that cannot be written is one warning, never an error."""
    root = str(cache_root())
    if root in _unwritable:
        return
    path = entry_path(kind, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as its zip writer's RuntimeError
        _unwritable.add(root)
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1]}"
        log.warning(
            "%s: cannot write the cache (%s); results are computed again next time; free space there "
            "or set SELFSUP_CACHE to a writable folder",
            root,
            reason,
        )
        with contextlib.suppress(OSError):  # under a path that is not a folder, unlink fails too
            tmp.unlink(missing_ok=True)
