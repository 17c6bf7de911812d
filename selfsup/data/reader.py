"""The one way through a shard folder: its manifest, and each shard's raw samples checked against it.

Every reader of shards (the training stream, ``shards verify``, the evaluator's ``read_split``)
goes through ``read_shard``. It reads with webdataset's tar iterators and compares the samples it
read with the manifest's count, so a truncated tar, a corrupt header (which makes Python's tarfile
end the stream early without an error) or any other shortfall becomes one ``ShardProblem`` naming
the shard, the sample where reading stopped and how many samples were lost. With ``sha256`` it also
hashes the bytes as they stream and reports a mismatch at the end of the shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import webdataset as wds

from selfsup.core.progress import progress
from selfsup.core.storage import is_remote, open_read
from selfsup.errors import OneLineError

T = TypeVar("T")
MANIFEST = "manifest.json"
PARTIAL = "WRITING-INCOMPLETE"  # written before `shards write` touches a folder, removed after its manifest

SHORT, CHECKSUM, EXTRA, UNKNOWN = "short", "checksum", "extra", "unknown"
DUPLICATE = "__duplicate__"  # stands in for a sample whose key an earlier sample of its tar has: its reason


class ManifestError(OneLineError, ValueError):
    """A shard folder without a usable manifest."""


def read_manifest(location: str) -> tuple[dict, list[str]]:
    """The manifest of a shard folder (local path or URL) and the URL of each shard, in order."""
    base = location.rstrip("/")
    try:
        with open_read(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        if _exists(f"{base}/{PARTIAL}"):
            raise ManifestError(partial_message(base)) from None
        raise ManifestError(
            f"{base} has no {MANIFEST}; for a folder of WebDataset tars run "
            f"`selfsup shards index {base}`, else write shards with `selfsup shards write` "
            "or check the path"
        ) from None
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise ManifestError(f"{base}/{MANIFEST} cannot be read: {err}") from None
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ManifestError(f"{base}/{MANIFEST} lists no shards; re-write the shards")
    return manifest, [f"{base}/{s['name']}" for s in manifest["shards"]]


def partial_message(location: str) -> str:
    """The line that refuses a shard folder whose `shards write` never finished (``PARTIAL`` is in it)."""
    return (
        f"{location} holds a partial `selfsup shards write` (stopped, or out of space; {PARTIAL} marks it): "
        "re-write it with `selfsup shards write`; do not index it"
    )


def _exists(url: str) -> bool:
    try:
        with open_read(url):
            return True
    except OSError:
        return False


def split_identity(location: str, listing: tuple[dict, list[str]]) -> dict:
    """What a shard folder's decoded content depends on, from its ``listing`` (:func:`read_manifest`):
    the manifest's shards (name, count, sha256, bytes) and, for local shards, each file's size and
    mtime (a rewritten file is new content)."""
    manifest, urls = listing
    shards = [{k: s.get(k) for k in ("name", "count", "sha256", "bytes")} for s in manifest["shards"]]
    if not is_remote(location):
        for shard, url in zip(shards, urls):
            stat = os.stat(url) if os.path.exists(url) else None
            shard["file"] = [stat.st_size, stat.st_mtime_ns] if stat else None
    return {"shards": shards, "classes": manifest.get("classes", [])}


@dataclass(frozen=True)
class ShardProblem:
    """A shard not read as its manifest says. ``position``: samples read before reading stopped
    (the index of the first one lost); ``lost``: samples of the range asked for that were not read;
    ``kind``: SHORT (lost samples), CHECKSUM (sha256 differs), EXTRA (more samples than listed) or
    UNKNOWN (a member of no sample: a name without an extension, which WebDataset drops)."""

    url: str
    position: int
    lost: int
    reason: str
    kind: str = SHORT

    def __str__(self) -> str:
        if self.kind == SHORT:
            return f"{self.url}: {self.reason}; {self.lost} samples lost"
        return f"{self.url}: {self.reason}"


class _Hashing:
    """A binary reader that hashes every byte read through it."""

    def __init__(self, raw):
        self.raw, self.hash = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        return data

    def hexdigest_of_all(self) -> str:
        """The sha256 of the whole file: what was read so far, then the rest."""
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def _samples(url: str, stream, unknown: list[str]) -> Iterator[dict]:
    """The tar's samples; the name of each member that belongs to no sample goes to ``unknown``."""

    def named(files):
        for f in files:
            if wds.tariterators.base_plus_ext(f["fname"])[0] is None:  # group_by_keys would drop it unsaid
                unknown.append(f["fname"])
                continue
            yield f

    files = wds.tariterators.tar_file_expander(
        [{"url": url, "stream": stream}], handler=wds.reraise_exception, eof_value=None
    )
    return wds.tariterators.group_by_keys(named(files), handler=wds.reraise_exception)


def _message(err: Exception) -> str:
    """An exception's own message, without the stream and URL that webdataset appends to its args."""
    first = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    return f"{type(err).__name__}: {first.split(' @ <')[0]}"


def read_shard(
    url: str,
    problems: list[ShardProblem],
    count: int | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    sha256: str | None = None,
    digests: list[str] | None = None,
) -> Iterator[dict]:
    """Raw samples (dicts of bytes, with ``__key__`` and ``__url__``) ``start`` to ``stop`` of one tar
    shard holding ``count`` samples by its manifest. What goes wrong is appended to ``problems``:
    reading that stops before ``stop`` (or ``count``) is one SHORT problem; with ``sha256`` (the
    manifest's hex digest) the whole file is hashed as it streams, and a mismatch is a CHECKSUM problem.
    With ``digests`` the whole file's sha256 is appended to it (``shards index``, which has no manifest yet).

    A sample whose key an earlier sample of the tar has (WebDataset groups members by adjacent keys, so
    a repeated key is a second sample) is yielded as ``{"__key__", "__url__", DUPLICATE: reason}``,
    which every decoder refuses: it keeps its position, and is counted where it falls. A member of no
    sample is an UNKNOWN problem of the read whose range holds the sample before it (the first sample,
    for members before it): WebDataset meets it while completing that sample."""
    end = stop if stop is not None else count
    hashing = bool(sha256) or digests is not None
    i, failed, digest = 0, None, None
    seen: dict[str, int] = {}
    unknown: list[str] = []
    try:
        with open_read(url) as raw:
            stream = _Hashing(raw) if hashing else raw
            try:
                for sample in _samples(url, stream, unknown):
                    key = sample["__key__"]
                    if key in seen:
                        sample = {
                            "__key__": key,
                            "__url__": sample.get("__url__", url),
                            DUPLICATE: f"its key repeats sample {seen[key]} of this tar (read once)",
                        }
                    seen.setdefault(key, i)
                    if i >= start:
                        problems += [ShardProblem(url, i, 0, _unknown_reason(n), UNKNOWN) for n in unknown]
                        yield sample
                    unknown.clear()
                    i += 1
                    if stop is not None and i >= stop:
                        break
                else:
                    problems += [ShardProblem(url, i, 0, _unknown_reason(n), UNKNOWN) for n in unknown]
            except Exception as err:  # truncated or unreadable tar: the rest of the range is lost
                failed = err
            digest = stream.hexdigest_of_all() if hashing else None
    except Exception as err:  # the shard cannot be opened, or its rest cannot be read
        failed = failed or err
    _check(url, problems, i, start, end, count, stop is None, failed)
    if digest is not None and digests is not None:
        digests.append(digest)
    if digest is not None and sha256 and digest != sha256:
        problems.append(
            ShardProblem(url, i, 0, "sha256 differs from the manifest (shard changed or corrupt)", CHECKSUM)
        )


def _unknown_reason(name: str) -> str:
    return f"member {name!r} has no extension, so it belongs to no sample; not read"


def _check(
    url: str,
    problems: list[ShardProblem],
    i: int,
    start: int,
    end: int | None,
    count: int | None,
    whole: bool,
    failed: Exception | None,
) -> None:
    """Append the problem, if any, of a read of [start, end) that stopped after ``i`` samples of a
    shard of ``count``; ``whole``: it read to the end of the tar."""
    lost = max(0, end - max(i, start)) if end is not None else 0
    says = f", the manifest says {count}" if count is not None else ""
    if failed is not None:
        problems.append(ShardProblem(url, i, lost, f"unreadable after sample {i} ({_message(failed)}){says}"))
    elif lost:
        problems.append(
            ShardProblem(url, i, lost, f"the tar ends after sample {i}{says} (a corrupt header or a truncated file)")
        )
    elif whole and count is not None and i > count:
        problems.append(ShardProblem(url, i, 0, f"{i} samples in the tar{says}", EXTRA))


def read_split(
    location: str, decode: Callable[[dict], T], limit: int | None = None, listing: tuple[dict, list[str]] | None = None
) -> tuple[list[T], dict, list[str]]:
    """Every decodable item of a shard folder, in order, its manifest, and one line per bad sample
    (``decode`` raised ValueError; the line names the shard and the error, which names the key) or
    bad shard. ``limit``: at most that many items, ``ceil(limit / shards)`` from the first samples
    of every shard. ``listing``: the folder's :func:`read_manifest`, when the caller has read it.
    An empty result is an error naming the folder."""
    manifest, urls = listing or read_manifest(location)
    per_shard = math.ceil(limit / max(1, len(urls))) if limit else None
    items: list[T] = []
    lines: list[str] = []
    total = min(limit, manifest["num_samples"]) if limit else manifest["num_samples"]
    with progress(
        total=total, desc=f"read {location}", unit="sample", mininterval=1.0, disable=bool(limit), leave=False
    ) as bar:
        for entry, url in zip(manifest["shards"], urls):
            problems: list[ShardProblem] = []
            taken = 0
            for sample in read_shard(url, problems, entry["count"]):
                if (per_shard and taken >= per_shard) or (limit and len(items) >= limit):
                    break
                try:
                    items.append(decode(sample))
                except ValueError as err:
                    lines.append(f"{url}: {err}")
                    continue
                taken += 1
                bar.update(1)
            lines += [str(p) for p in problems]
    if not items:
        raise ValueError(
            f"{location}: the split is empty (no decodable samples); run `selfsup shards verify {location}`"
        )
    return items, manifest, lines
