"""Whether an evaluation's test split is held out from its train split. Not when both are the same
shard folder, or the same shards (every test shard's sha256 in the train manifest: a copy), or when
test samples decode to the same content as train samples (the manifests hash shards, not samples,
so samples are hashed here from the decoded inputs the evaluator holds anyway)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable

import numpy as np

from selfsup.core.storage import is_remote
from selfsup.data.reader import read_manifest
from selfsup.tasks import LabelledSplit

log = logging.getLogger("selfsup.evaluate")

NOT_HELD_OUT = "kNN and probe scores are not held-out"


def _folder(location: str) -> str:
    """A shard folder's identity: its real path, or its URL without the trailing slash."""
    return location.rstrip("/") if is_remote(location) else os.path.realpath(location)


def _shard_digests(location: str) -> set[str]:
    """The sha256 of every shard its manifest lists."""
    return {s["sha256"] for s in read_manifest(location)[0]["shards"] if s.get("sha256")}


def _sample_digests(inputs: Iterable) -> list[bytes]:
    """One 128-bit BLAKE2 digest per decoded sample (a row of uint8 (N, C, H, W) images, or a float32 (T,) wave)."""
    return [hashlib.blake2b(np.ascontiguousarray(np.asarray(x)).tobytes(), digest_size=16).digest() for x in inputs]


def overlap(train: LabelledSplit, test: LabelledSplit) -> str | None:
    """Why ``test`` is not held out from ``train``, in one line, or None when no test sample is in train."""
    if _folder(train.location) == _folder(test.location):
        return f"--train and --test are the same shards (the same folder {test.location}): {NOT_HELD_OUT}"
    test_shards = _shard_digests(test.location)
    if test_shards and test_shards <= _shard_digests(train.location):
        return (
            f"--train and --test are the same shards (every shard of {test.location} has the sha256 of one "
            f"of {train.location}): {NOT_HELD_OUT}"
        )
    in_train = set(_sample_digests(train.inputs))
    shared = sum(d in in_train for d in _sample_digests(test.inputs))
    if shared:
        return (
            f"{shared} of {len(test.labels)} --test samples are also in --train (the same decoded content): "
            f"{NOT_HELD_OUT} for them"
        )
    return None


def held_out_warnings(train: LabelledSplit, test: LabelledSplit) -> list[str]:
    """The report note ``warning: <overlap>`` when ``test`` is not held out from ``train`` (also logged), else []."""
    reason = overlap(train, test)
    if reason is None:
        return []
    log.warning(reason)
    return [f"warning: {reason}"]
