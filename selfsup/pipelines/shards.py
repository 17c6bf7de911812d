"""Write, verify and inspect WebDataset shards and their ``manifest.json``.

A shard folder holds ``<split>-000000.tar`` … (plain WebDataset tars: ``<key>.png`` + ``<key>.cls``
for images, ``<key>.flac`` + ``<key>.json`` for audio) and ``manifest.json`` listing every shard
with its sample count and sha256, which loaders use to plan equal steps per rank without reading data.
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
from tqdm import tqdm

from .. import __version__
from .storage import open_read

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A shard folder without a usable manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_shards(samples: Iterable[dict], out_dir: str | Path, *, split: str = "train", kind: str = "image",
                 classes: list[str] | None = None, total: int | None = None, samples_per_shard: int = 5000,
                 source: str = "") -> dict:
    """Write samples as tar shards plus ``manifest.json``; returns the manifest.

    Each sample is a dict of WebDataset fields (``__key__`` and extensions). A sample holding
    ``__error__`` is skipped and listed in the manifest under ``skipped``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    skipped: list[str] = []
    writer, count, path = None, 0, None

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            shards.append({"name": path.name, "count": count, "sha256": sha256_file(path),
                           "bytes": path.stat().st_size})
            writer = None

    with tqdm(samples, total=total, desc=f"shards {out}/{split}", unit="sample", mininterval=1.0) as bar:
        for sample in bar:
            if "__error__" in sample:
                skipped.append(sample["__error__"])
                continue
            if writer is None or count >= samples_per_shard:
                close()
                path = out / f"{split}-{len(shards):06d}.tar"
                writer, count = wds.TarWriter(str(path)), 0
            writer.write(sample)
            count += 1
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


def read_manifest(location: str) -> tuple[dict, list[str]]:
    """The manifest of a shard folder (local path or URL) and the URL of each shard, in order."""
    base = location.rstrip("/")
    try:
        with open_read(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise ManifestError(f"{base} has no {MANIFEST}; write shards with `selfsup shards write` "
                            "or check the path") from None
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise ManifestError(f"{base}/{MANIFEST} cannot be read: {err}") from None
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ManifestError(f"{base}/{MANIFEST} lists no shards; re-write the shards")
    return manifest, [f"{base}/{s['name']}" for s in manifest["shards"]]


@dataclass
class VerifyReport:
    """What ``verify_shards`` found: counts of good samples and a line per problem."""

    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def decode_sample(sample: dict, kind: str):
    """Decode one raw sample's payload; raises ValueError naming the key when it is bad."""
    key = sample.get("__key__", "?")
    if kind == "image":
        import numpy as np
        from PIL import Image

        if "png" not in sample or "cls" not in sample:
            raise ValueError(f"sample {key}: needs .png and .cls, has {sorted(k for k in sample if not k.startswith('__'))}")
        try:
            img = np.asarray(Image.open(io.BytesIO(sample["png"])))
            label = int(sample["cls"])
        except Exception as err:  # PIL raises many types for bad bytes
            raise ValueError(f"sample {key}: undecodable ({type(err).__name__}: {err})") from None
        return img, label
    if kind == "audio":
        from ..audio.decode import decode_audio

        if "flac" not in sample or "json" not in sample:
            raise ValueError(f"sample {key}: needs .flac and .json")
        return decode_audio(sample["flac"], key), json.loads(sample["json"])
    raise ValueError(f"unknown sample format {kind!r}")


def iter_shard(url: str, handler=None):
    """Raw samples (dicts of bytes) of one tar shard."""
    handler = handler or wds.reraise_exception
    with open_read(url) as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler, eof_value=None)
        yield from wds.tariterators.group_by_keys(files, handler=handler)


def verify_shards(location: str) -> VerifyReport:
    """Check every shard's checksum and sample count against the manifest, and decode every sample."""
    manifest, urls = read_manifest(location)
    report = VerifyReport(shards=len(urls))
    kind = manifest.get("format", "image")
    for entry, url in tqdm(list(zip(manifest["shards"], urls)), desc=f"verify {location}", unit="shard"):
        local = Path(url)
        if local.exists() and sha256_file(local) != entry["sha256"]:
            report.problems.append(f"{url}: sha256 differs from the manifest (shard changed or corrupt)")
        n = 0
        try:
            for sample in iter_shard(url):
                try:
                    decode_sample(sample, kind)
                    n += 1
                except ValueError as err:
                    report.problems.append(f"{url}: {err}")
        except Exception as err:  # truncated tar, unreadable file
            report.problems.append(f"{url}: unreadable after {n} samples ({type(err).__name__}: {err})")
        if n != entry["count"]:
            report.problems.append(f"{url}: {n} good samples, manifest says {entry['count']}")
        report.samples += n
    return report


def shards_info(location: str) -> dict:
    """Counts per shard and per class (classes counted from the manifest only)."""
    manifest, _ = read_manifest(location)
    return {"format": manifest.get("format"), "num_samples": manifest["num_samples"],
            "num_shards": len(manifest["shards"]), "classes": manifest.get("classes", []),
            "source": manifest.get("source", ""), "skipped_at_write": len(manifest.get("skipped", []))}
