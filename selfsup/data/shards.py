"""Write, verify and inspect WebDataset shards and their ``manifest.json``.

A shard folder holds ``<split>-000000.tar`` … (plain WebDataset tars: ``<key>.jpg`` or ``<key>.png`` +
``<key>.cls`` for images, ``<key>.flac`` + ``<key>.json`` for audio) and ``manifest.json`` listing every
shard with its sample count and sha256 and, for images, each image's ``[width, height]`` (``sizes``), for
audio each clip's duration in seconds (``durations``), null for a sample the reader skips, which loaders
use to plan equal steps per rank, audio batches by length and how views are cut from images, without
reading data. Shards written from files (``shards write image-folder`` / ``audio-folder``) have a
``source-files.json`` next to the manifest (named by its ``source_files``) mapping each sample's key to
the file it came from, which ``shards verify`` names for a bad sample. ``index_shards`` writes the
manifest of a folder of plain WebDataset tars written by other tools.

A write marks its folder partial (``reader.PARTIAL``) and removes an earlier manifest before its first
tar, and writes its manifest last: a write that is killed or runs out of space leaves a folder that every
reader and ``index_shards`` refuse, never an old manifest beside new tars.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from selfsup._version import __version__
from selfsup.core.progress import progress
from selfsup.core.storage import open_read
from selfsup.data.decode import IMAGE_KEYS, decode_sample, open_image, refuse_duplicate
from selfsup.data.reader import (
    MANIFEST,
    PARTIAL,
    SHORT,
    ManifestError,
    ShardProblem,
    partial_message,
    read_manifest,
    read_shard,
)
from selfsup.data.sources import BadInput, DatasetNotFound
from selfsup.errors import OneLineError

SOURCE_FILES = "source-files.json"  # {sample key: the file it was written from}, beside the manifest


class ShardWriteError(OneLineError):
    """`shards write` could not finish (out of space): the folder is left marked partial."""


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
    """An image sample's [width, height] from its encoded image's header (nothing is decoded), or None
    when the reader will skip it (an unreadable header, more than ``MAX_IMAGE_PIXELS``)."""
    try:
        return list(open_image(sample)[0].size)
    except ValueError:
        return None


def _manifest_text(manifest: dict) -> str:
    """The manifest as indented JSON with one line per shard (so that sizes and durations stay compact)."""
    lines = ",\n  ".join(json.dumps(s, separators=(",", ":")) for s in manifest["shards"])
    text = json.dumps({**manifest, "shards": "@shards@"}, indent=1)
    return text.replace('"@shards@"', f"[\n  {lines}\n ]" if lines else "[]")


def _save(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (through a temporary file beside it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _output_folder(out_dir: str | Path) -> Path:
    """``out_dir``, created if missing; raises BadInput naming it when it cannot be created or written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(
            f"{out}: cannot create the output folder ({err.strerror or err}); pass an OUT that can be created"
        ) from None
    if not os.access(out, os.W_OK):
        raise BadInput(f"{out}: the output folder is not writable; pass another OUT or fix its permissions")
    return out


def image_sizes(manifest: dict) -> set[tuple[int, int]] | None:
    """The distinct (width, height) of an image shard folder's images (a size is null for an image the
    reader skips), or None when its manifest does not record sizes (shards written by an older selfsup)."""
    shards = manifest["shards"]
    if not shards or any("sizes" not in s for s in shards):
        return None
    return {(size[0], size[1]) for s in shards for size in s["sizes"] if size}


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    *,
    split: str = "train",
    kind: str = "image",
    classes: list[str] | None = None,
    total: int | None = None,
    samples_per_shard: int = 5000,
    source: str = "",
    extra: dict | None = None,
) -> dict:
    """Write samples as tar shards plus ``manifest.json``; returns the manifest.

    Each sample is a dict of WebDataset fields (``__key__`` and extensions). A sample holding
    ``__error__`` is skipped and listed in the manifest under ``skipped``; one holding ``__converted__``
    (a line saying how its image was converted) is written and listed under ``converted``; one holding
    ``__source__`` (its file) is listed in ``SOURCE_FILES``. For ``kind="image"`` each shard lists its
    images' ``sizes`` (from their headers), for ``kind="audio"`` its clips' ``durations`` (from their
    ``.json``), null for one the reader will skip. ``extra``: more manifest fields (``max_side``). Every
    member's mtime is the whole second the writing began: a fractional one costs each member a pax
    header, which doubles a small image's share of the tar.
    """
    out = _output_folder(out_dir)
    _begin(out)
    try:
        written, origins = _write_tars(samples, out, split, kind, total, samples_per_shard)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ShardWriteError(
            f"{out}: out of space ({err.strerror}); the output is partial ({PARTIAL} marks it) "
            "and must be re-written, not indexed: free space or pass another OUT, then run "
            "`selfsup shards write` again"
        ) from None
    converted = written.pop("converted")
    if not written["shards"]:  # an empty manifest would only fail later, as a run with too few samples
        skipped = written["skipped"]
        first = f"; the first of {len(skipped)} skipped: {skipped[0]}" if skipped else ""
        raise BadInput(f"{source or 'the source'}: no sample could be written to {out}{first}")
    manifest = {
        "format": kind,
        "split": split,
        "classes": classes or [],
        **written,
        **({"converted": converted} if converted else {}),
        **(extra or {}),
        **({"source_files": SOURCE_FILES} if origins else {}),
        "source": source,
        "created_by": f"selfsup {__version__}",
    }
    _finish(out, split, manifest, origins)
    return manifest


def _begin(out: Path) -> None:
    """Mark ``out`` partial, then remove an earlier write's manifest and source list: a write stopped
    from here on leaves a folder every reader refuses, never old manifest beside new tars."""
    try:
        (out / PARTIAL).write_text(
            f"selfsup {__version__} began writing shards here; remove this folder's tars and write them again\n"
        )
    except OSError as err:
        with contextlib.suppress(OSError):
            (out / PARTIAL).unlink(missing_ok=True)
        raise ShardWriteError(
            f"{out}: cannot begin writing ({err.strerror or err}); nothing in it was changed; "
            "free space or pass another OUT"
        ) from None
    for name in (MANIFEST, SOURCE_FILES):
        (out / name).unlink(missing_ok=True)


def _finish(out: Path, split: str, manifest: dict, origins: dict[str, str]) -> None:
    """Remove ``split``'s tars of an earlier, longer write; write the source list, then the manifest, then
    lift the partial mark: whichever step a kill stops, the folder is refused or whole."""
    written = {s["name"] for s in manifest["shards"]}
    for tar in out.glob(f"{split}-*.tar"):
        if tar.name not in written and re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", tar.name):
            tar.unlink()
    try:
        if origins:
            _save(out / SOURCE_FILES, json.dumps(origins, indent=0))
        _save(out / MANIFEST, _manifest_text(manifest))
    except OSError as err:
        raise ShardWriteError(
            f"{out}: cannot write {MANIFEST} ({err.strerror or err}); the output is partial "
            f"({PARTIAL} marks it): free space, then run `selfsup shards write` again"
        ) from None
    (out / PARTIAL).unlink()


def _abandon(writer: wds.TarWriter) -> None:
    """Close a tar that failed to write, dropping what it still buffers."""
    for close in (writer.tarstream.close, writer.stream.close):
        with contextlib.suppress(OSError):
            close()


def _write_tars(
    samples: Iterable[dict], out: Path, split: str, kind: str, total: int | None, samples_per_shard: int
) -> tuple[dict, dict[str, str]]:
    """Write the tars of :func:`write_shards`: (the manifest's num_samples, shards, skipped and converted,
    {key: source file})."""
    mtime = int(time.time())
    shards: list[dict] = []
    skipped: list[str] = []
    converted: list[str] = []
    origins: dict[str, str] = {}
    writer, count, path = None, 0, None
    per_sample: list[Any] = []

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            shards.append(
                {"name": path.name, "count": count, "sha256": sha256_file(path), "bytes": path.stat().st_size}
            )
            if kind in ("audio", "image"):
                shards[-1]["durations" if kind == "audio" else "sizes"] = list(per_sample)
            writer = None

    try:
        with progress(samples, total=total, desc=f"shards {out}/{split}", unit="sample", mininterval=1.0) as bar:
            for sample in bar:
                if "__error__" in sample:
                    skipped.append(sample["__error__"])
                    continue
                if "__converted__" in sample:
                    converted.append(sample.pop("__converted__"))
                if "__source__" in sample:
                    origins[sample["__key__"]] = sample.pop("__source__")
                if writer is None or count >= samples_per_shard:
                    close()
                    path = out / f"{split}-{len(shards):06d}.tar"
                    writer, count, per_sample = wds.TarWriter(str(path), mtime=mtime), 0, []
                writer.write(sample)
                count += 1
                if kind in ("audio", "image"):  # per sample: a clip's duration or an image's size
                    per_sample.append(_duration(sample) if kind == "audio" else _size(sample))
        close()
    except OSError:
        if writer is not None:  # its buffered bytes would be written to the full disk again at exit
            _abandon(writer)
        raise
    return {
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
        "skipped": skipped,
        "converted": converted,
    }, origins


@dataclass
class VerifyReport:
    """What ``verify_shards`` found: counts of good samples and a line per problem."""

    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def source_files(location: str, manifest: dict) -> dict[str, str]:
    """{sample key: the file it was written from} of a shard folder, from its ``SOURCE_FILES``; empty when
    the manifest names none (shards written from idx files or by an older selfsup) or it cannot be read."""
    if "source_files" not in manifest:
        return {}
    try:
        with open_read(f"{location.rstrip('/')}/{manifest['source_files']}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def verify_shards(location: str) -> VerifyReport:
    """Read every shard whole, checking its sha256 and sample count against the manifest, and decode
    every sample; one problem line per bad sample (naming its source file when the folder lists it) or shard."""
    manifest, urls = read_manifest(location)
    origins = source_files(location, manifest)
    report = VerifyReport(shards=len(urls))
    kind = manifest.get("format", "image")
    for entry, url in progress(list(zip(manifest["shards"], urls)), desc=f"verify {location}", unit="shard"):
        problems: list[ShardProblem] = []
        for sample in read_shard(url, problems, entry["count"], sha256=entry["sha256"]):
            try:
                decode_sample(sample, kind)
                report.samples += 1
            except ValueError as err:
                origin = origins.get(sample.get("__key__", ""))
                report.problems.append(f"{url}: {err}" + (f" (written from {origin})" if origin else ""))
        report.problems += [str(p) for p in problems]
    return report


def shards_info(location: str) -> dict:
    """Counts per shard and per class (classes counted from the manifest only)."""
    manifest, _ = read_manifest(location)
    return {
        "format": manifest.get("format"),
        "num_samples": manifest["num_samples"],
        "num_shards": len(manifest["shards"]),
        "classes": manifest.get("classes", []),
        "source": manifest.get("source", ""),
        "skipped_at_write": len(manifest.get("skipped", [])),
        "converted_at_write": len(manifest.get("converted", [])),
    }


def _sample_kind(sample: dict, url: str) -> str:
    """The folder's kind, image or audio, from the extensions of a tar's first sample; ManifestError
    naming the tar and what selfsup reads when they fit neither."""
    if any(k in sample for k in IMAGE_KEYS):
        return "image"
    if "flac" in sample:
        return "audio"
    found = sorted(k for k in sample if not k.startswith("__"))
    raise ManifestError(
        f"{url}: sample {sample.get('__key__', '?')} has {found}; selfsup reads images as "
        ".jpg/.jpeg/.png + .cls and audio as .flac + .json; re-write the data with "
        "`selfsup shards write image-folder` or `audio-folder`"
    )


def _sample_facts(sample: dict, kind: str) -> tuple[list[int] | float, int | None]:
    """An image sample's ([width, height], label) or an audio sample's (duration in seconds, label or
    None), from headers only (nothing is decoded); raises ValueError naming the key when the reader
    would skip it."""
    key = sample.get("__key__", "?")
    if kind == "image":
        img, label = open_image(sample)
        return list(img.size), label
    refuse_duplicate(sample)
    if "flac" not in sample or "json" not in sample:
        raise ValueError(f"sample {key}: needs .flac and .json")
    import soundfile as sf

    try:
        info = json.loads(sample["json"])
        duration = _duration(sample) or round(sf.info(io.BytesIO(sample["flac"])).duration, 6)
    except Exception as err:  # noqa: BLE001 - a bad .json or FLAC header; the reader skips the sample
        raise ValueError(f"sample {key}: unreadable .json or .flac header ({type(err).__name__}: {err})") from None
    label = info.get("label") if isinstance(info, dict) else None
    return duration, int(label) if isinstance(label, (int, float)) else None


def _index_shard(tar: Path, kind: str | None, lines: list[str], labels: set[int]) -> tuple[dict, str | None]:
    """The manifest entry of one plain tar (and the folder's kind, from its first sample if ``kind`` is
    None), read once; a line per sample the reader would skip goes to ``lines``, each label to ``labels``."""
    url, count = str(tar), 0
    problems: list[ShardProblem] = []
    digests: list[str] = []
    per_sample: list[Any] = []  # a size or duration, None for a sample the reader would skip
    for sample in read_shard(url, problems, digests=digests):
        kind = kind or _sample_kind(sample, url)
        count += 1
        try:
            fact, label = _sample_facts(sample, kind)
        except ValueError as err:
            lines.append(f"{url}: {err}")
            per_sample.append(None)
            continue
        per_sample.append(fact)
        if label is not None:
            labels.add(label)
    if broken := [p for p in problems if p.kind == SHORT]:
        raise ManifestError(
            f"{url}: {broken[0].reason}; re-create this tar or move it out of {tar.parent}, then index again"
        )
    lines += [str(p) for p in problems]
    entry = {
        "name": tar.name,
        "count": count,
        "sha256": digests[0],
        "bytes": tar.stat().st_size,
        "durations" if kind == "audio" else "sizes": per_sample,
    }
    return entry, kind


def index_shards(folder: str | Path, split: str = "train", classes: list[str] | None = None) -> tuple[dict, list[str]]:
    """Write ``manifest.json`` for a folder of plain WebDataset tars (``webdataset.TarWriter`` or ``tar``;
    ``.jpg``/``.png`` + ``.cls`` images, or ``.flac`` + ``.json`` audio), reading each tar once: sample
    counts, sha256, image sizes or clip durations, as ``write_shards`` records them. The tars are not
    changed. ``classes``: the class names in label order (default: none). Returns the manifest and a
    line per sample the reader will skip; raises ManifestError naming the folder or tar that cannot be indexed."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetNotFound(f"{root} does not exist; pass the folder holding the .tar shards")
    if (root / PARTIAL).exists():
        raise ManifestError(partial_message(str(root)))
    if (root / MANIFEST).exists():
        raise ManifestError(f"{root} already has a {MANIFEST}; delete it to index the tars again")
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise ManifestError(f"{root} has no .tar files to index; pass the folder holding the WebDataset shards")
    shards: list[dict] = []
    lines: list[str] = []
    labels: set[int] = set()
    kind: str | None = None
    for tar in progress(tars, desc=f"index {root}", unit="shard"):
        entry, kind = _index_shard(tar, kind, lines, labels)
        shards.append(entry)
    if not any(s["count"] for s in shards):
        raise ManifestError(f"{root}: its .tar files hold no samples")
    if classes and labels and max(labels) >= len(classes):
        raise ManifestError(
            f"{root}: labels go up to {max(labels)} but --classes names {len(classes)} classes; "
            "name one class per label, in label order"
        )
    manifest = {
        "format": kind,
        "split": split,
        "classes": classes or [],
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
        "skipped": [],
        "source": f"indexed {root}",
        "created_by": f"selfsup {__version__}",
    }
    _save(root / MANIFEST, _manifest_text(manifest))
    return manifest, lines
