"""A content-addressed cache of computed results under ``$SELFSUP_CACHE`` (``config.cache_root``):
an evaluation's decoded splits and its baselines' scores, each filed under the digest of what
produced it, so that a changed input is a new key and never a stale hit. Entries are written
atomically and read with ``weights_only``; an unreadable entry is a miss, and is written again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from selfsup.config import cache_root

log = logging.getLogger("selfsup.cache")


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
    atomically; a cache that cannot be written is a warning, never an error."""
    path = entry_path(kind, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, tmp)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("%s: cannot write the cache (%s); set SELFSUP_CACHE to a writable folder", path, err)
        tmp.unlink(missing_ok=True)
