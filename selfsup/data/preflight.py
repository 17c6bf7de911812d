"""Pre-flight: the run's data checked against its config before Ray starts and before the first step.

:func:`check_data` reads only manifests and one image header per folder. What can never train (a
missing folder or manifest, fewer samples than one global batch, shards written smaller than
``data.image_size``) is a :class:`DataProblem` naming the key and what to change; what the config
allows but converts (RGB images for a grey model, images of another size than the views) comes back
as notes, said once by the caller.
"""

from __future__ import annotations

import io
from pathlib import Path

from selfsup.config import ExperimentConfig
from selfsup.core.storage import is_remote
from selfsup.data.reader import ManifestError, read_manifest, read_shard
from selfsup.errors import OneLineError

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class DataProblem(OneLineError, ValueError):
    """The run's data cannot train this config; the message names the key and what to change."""


def listing(key: str, location: str) -> tuple[dict, list[str]]:
    """The manifest and shard URLs of the folder at config key ``key``; a DataProblem naming the key
    when the folder or its manifest is missing or unreadable."""
    if not is_remote(location) and not location.startswith("pipe:") and not Path(location).exists():
        raise DataProblem(
            f"{key}={location} does not exist; check the path, or set {key}=DIR "
            "(a folder written by `selfsup shards write`)"
        )
    try:
        return read_manifest(location)
    except ManifestError as err:
        raise DataProblem(f"{key}: {err}") from None


def max_side_problem(manifest: dict, image_size: int, location: str) -> str | None:
    """Why shards written with ``--max-side`` below ``image_size`` cannot train it, or None."""
    side = manifest.get("max_side")
    if side and side < image_size:
        return (
            f"data.image_size {image_size} is larger than the {side} px long side the shards at "
            f"{location} were written with (`shards write --max-side {side}`); re-write them with "
            f"--max-side {image_size} or more, or set data.image_size={side}"
        )
    return None


def first_image_mode(urls: list[str], manifest: dict) -> str | None:
    """The PIL mode (``L``, ``RGB`` …) of the folder's first image, from its header; None when
    unreadable."""
    from PIL import Image

    from selfsup.data.decode import image_payload

    for entry, url in zip(manifest["shards"], urls):
        for sample in read_shard(url, [], entry["count"], stop=1):
            try:
                return Image.open(io.BytesIO(image_payload(sample)[0])).mode
            except Exception:  # noqa: BLE001 - a bad first sample: the reader skips and counts it
                return None
    return None


def conversion_notes(
    key: str, location: str, listed: tuple[dict, list[str]], channels: int, image_size: int | None
) -> list[str]:
    """What reading the image folder ``listed`` at ``channels`` (and views at ``image_size``) converts."""
    from selfsup.data.shards import image_sizes

    manifest, urls = listed
    notes = []
    mode = first_image_mode(urls, manifest)
    if mode is not None:
        grey = mode in GREY_MODES
        if grey and channels != 1:
            notes.append(f"{key}={location} holds grey images ({mode}); each is repeated to data.channels={channels}")
        elif not grey and channels == 1:
            notes.append(f"{key}={location} holds {mode} images; each is converted to grey (data.channels=1)")
    sizes = image_sizes(manifest) or set()
    if image_size is not None and len(sizes) == 1 and (size := next(iter(sizes))) != (image_size, image_size):
        notes.append(
            f"{key}={location} holds {size[0]}x{size[1]} px images; views are cropped and resized "
            f"to data.image_size={image_size}"
        )
    return notes


def check_data(cfg: ExperimentConfig, ranks: int) -> list[str]:
    """Check ``data.train`` (and ``data.test`` when set) of ``cfg`` trained on ``ranks`` ranks: raise
    DataProblem for what can never train; return the notes on what the config converts."""
    d = cfg.data
    train = listing("data.train", d.train)
    manifest = train[0]
    count = sum(s["count"] for s in manifest["shards"])
    if count == 0:
        skipped = manifest.get("skipped", [])
        first = f"; the first of its {len(skipped)} skipped files: {skipped[0]}" if skipped else ""
        raise DataProblem(f"data.train={d.train} holds no samples{first}; re-write the shards from readable files")
    batch = d.batch_size * ranks
    if d.max_tokens is None and count < batch:
        per = f" per rank x {ranks} ranks (scaling.num_workers)" if ranks > 1 else ""
        fits = count // ranks
        change = f"set data.batch_size={fits} or less" if fits else f"set scaling.num_workers={count} or less"
        raise DataProblem(
            f"data.train={d.train} holds {count} samples, fewer than one batch of "
            f"{d.batch_size}{per}: {change}, or add samples"
        )
    notes = []
    if d.kind == "image":
        if problem := max_side_problem(manifest, d.image_size, d.train):
            raise DataProblem(problem)
        notes += conversion_notes("data.train", d.train, train, d.channels, d.image_size)
    if d.test is not None:
        test = listing("data.test", d.test)
        if not sum(s["count"] for s in test[0]["shards"]):
            raise DataProblem(f"data.test={d.test} holds no samples; re-write it, or unset data.test")
        if d.kind == "image":
            notes += conversion_notes("data.test", d.test, test, d.channels, None)
    return notes
