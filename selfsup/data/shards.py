"""Write, verify and inspect WebDataset shards and their ``manifest.json``.

A shard folder holds ``<split>-000000.tar`` … (plain WebDataset tars: ``<key>.png`` + ``<key>.cls``
for images, ``<key>.flac`` + ``<key>.json`` for audio) and ``manifest.json`` listing every shard
with its sample count and sha256 and, for audio, each clip's duration in seconds (``durations``), which
loaders use to plan equal steps per rank (and audio batches by length) without reading data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from selfsup._version import __version__
from selfsup.data.decode import decode_sample
from selfsup.data.reader import MANIFEST, ShardProblem, read_manifest, read_shard


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _duration(sample: dict) -> float | None:
    """An audio sample's ``duration`` (seconds) from its ``.json`` (a dict or its encoded bytes), or None."""
    info = sample.get("json")
    if isinstance(info, (bytes, str)):
        info = json.loads(info)
    duration = info.get("duration") if isinstance(info, dict) else None
    return round(float(duration), 6) if isinstance(duration, (int, float)) else None


def write_shards(samples: Iterable[dict], out_dir: str | Path, *, split: str = "train", kind: str = "image",
                 classes: list[str] | None = None, total: int | None = None, samples_per_shard: int = 5000,
                 source: str = "") -> dict:
    """Write samples as tar shards plus ``manifest.json``; returns the manifest.

    Each sample is a dict of WebDataset fields (``__key__`` and extensions). A sample holding
    ``__error__`` is skipped and listed in the manifest under ``skipped``. For ``kind="audio"`` each
    shard lists its clips' ``durations`` (from their ``.json``), when every clip has one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    skipped: list[str] = []
    writer, count, path, durations = None, 0, None, []

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            shards.append({"name": path.name, "count": count, "sha256": sha256_file(path),
                           "bytes": path.stat().st_size})
            if kind == "audio" and None not in durations:
                shards[-1]["durations"] = list(durations)
            writer = None

    with tqdm(samples, total=total, desc=f"shards {out}/{split}", unit="sample", mininterval=1.0) as bar:
        for sample in bar:
            if "__error__" in sample:
                skipped.append(sample["__error__"])
                continue
            if writer is None or count >= samples_per_shard:
                close()
                path = out / f"{split}-{len(shards):06d}.tar"
                writer, count, durations = wds.TarWriter(str(path)), 0, []
            writer.write(sample)
            count += 1
            if kind == "audio":
                durations.append(_duration(sample))
    close()
    manifest = {
        "format": kind, "split": split, "classes": classes or [],
        "num_samples": sum(s["count"] for s in shards), "shards": shards, "skipped": skipped,
        "source": source, "created_by": f"selfsup {__version__}",
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


@dataclass
class VerifyReport:
    """What ``verify_shards`` found: counts of good samples and a line per problem."""

    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(location: str) -> VerifyReport:
    """Read every shard whole, checking its sha256 and sample count against the manifest, and decode
    every sample; one problem line per bad sample or shard."""
    manifest, urls = read_manifest(location)
    report = VerifyReport(shards=len(urls))
    kind = manifest.get("format", "image")
    for entry, url in tqdm(list(zip(manifest["shards"], urls)), desc=f"verify {location}", unit="shard"):
        problems: list[ShardProblem] = []
        for sample in read_shard(url, problems, entry["count"], sha256=entry["sha256"]):
            try:
                decode_sample(sample, kind)
                report.samples += 1
            except ValueError as err:
                report.problems.append(f"{url}: {err}")
        report.problems += [str(p) for p in problems]
    return report


def shards_info(location: str) -> dict:
    """Counts per shard and per class (classes counted from the manifest only)."""
    manifest, _ = read_manifest(location)
    return {"format": manifest.get("format"), "num_samples": manifest["num_samples"],
            "num_shards": len(manifest["shards"]), "classes": manifest.get("classes", []),
            "source": manifest.get("source", ""), "skipped_at_write": len(manifest.get("skipped", []))}
