"""Write, verify and inspect WebDataset shards and their ``manifest.json``.

A shard folder holds ``<split>-000000.tar`` … (plain WebDataset tars: ``<key>.jpg`` or ``<key>.png`` +
``<key>.cls`` for images, ``<key>.flac`` + ``<key>.json`` for audio) and ``manifest.json`` listing every
shard with its sample count and sha256 and, for images, each image's ``[width, height]`` (``sizes``), for
audio each clip's duration in seconds (``durations``), which loaders use to plan equal steps per rank,
audio batches by length and how views are cut from images, without reading data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from selfsup._version import __version__
from selfsup.data.decode import decode_sample, image_payload
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


def _size(sample: dict) -> list[int] | None:
    """An image sample's [width, height] from its encoded image's header (nothing is decoded), or None."""
    try:
        return list(Image.open(io.BytesIO(image_payload(sample)[0])).size)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes; the reader counts the sample
        return None


def _manifest_text(manifest: dict) -> str:
    """The manifest as indented JSON with one line per shard (so that sizes and durations stay compact)."""
    lines = ",\n  ".join(json.dumps(s, separators=(",", ":")) for s in manifest["shards"])
    text = json.dumps({**manifest, "shards": "@shards@"}, indent=1)
    return text.replace('"@shards@"', f"[\n  {lines}\n ]" if lines else "[]")


def image_sizes(manifest: dict) -> set[tuple[int, int]] | None:
    """The distinct (width, height) of an image shard folder's images, or None when its manifest does
    not record every image's size (shards written by an older selfsup)."""
    shards = manifest["shards"]
    if not shards or any("sizes" not in s for s in shards):
        return None
    return {(w, h) for s in shards for w, h in s["sizes"]}


def write_shards(samples: Iterable[dict], out_dir: str | Path, *, split: str = "train", kind: str = "image",
                 classes: list[str] | None = None, total: int | None = None, samples_per_shard: int = 5000,
                 source: str = "", extra: dict | None = None) -> dict:
    """Write samples as tar shards plus ``manifest.json``; returns the manifest.

    Each sample is a dict of WebDataset fields (``__key__`` and extensions). A sample holding
    ``__error__`` is skipped and listed in the manifest under ``skipped``; one holding ``__converted__``
    (a line saying how its image was converted) is written and listed under ``converted``. For
    ``kind="image"`` each shard lists its images' ``sizes`` (from their headers), for ``kind="audio"``
    its clips' ``durations`` (from their ``.json``), when every sample has one. ``extra``: more manifest
    fields (``max_side``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    skipped: list[str] = []
    converted: list[str] = []
    writer, count, path, per_sample = None, 0, None, []

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            shards.append({"name": path.name, "count": count, "sha256": sha256_file(path),
                           "bytes": path.stat().st_size})
            if kind in ("audio", "image") and None not in per_sample:
                shards[-1]["durations" if kind == "audio" else "sizes"] = list(per_sample)
            writer = None

    with tqdm(samples, total=total, desc=f"shards {out}/{split}", unit="sample", mininterval=1.0) as bar:
        for sample in bar:
            if "__error__" in sample:
                skipped.append(sample["__error__"])
                continue
            if "__converted__" in sample:
                converted.append(sample.pop("__converted__"))
            if writer is None or count >= samples_per_shard:
                close()
                path = out / f"{split}-{len(shards):06d}.tar"
                writer, count, per_sample = wds.TarWriter(str(path)), 0, []
            writer.write(sample)
            count += 1
            if kind in ("audio", "image"):  # per sample: a clip's duration or an image's size
                per_sample.append(_duration(sample) if kind == "audio" else _size(sample))
    close()
    manifest = {
        "format": kind, "split": split, "classes": classes or [],
        "num_samples": sum(s["count"] for s in shards), "shards": shards, "skipped": skipped,
        **({"converted": converted} if converted else {}), **(extra or {}),
        "source": source, "created_by": f"selfsup {__version__}",
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(_manifest_text(manifest))
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
            "source": manifest.get("source", ""), "skipped_at_write": len(manifest.get("skipped", [])),
            "converted_at_write": len(manifest.get("converted", []))}
