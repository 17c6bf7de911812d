"""Readers of real datasets, each yielding samples ready for ``shards.write_shards``.

A sample is a dict: ``{"__key__": str, "png": bytes, "cls": int}`` for images.
For audio: ``{"__key__": str, "flac": bytes (16 kHz mono), "json": {"duration", "original_rate", "path", ...}}``.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFound(FileNotFoundError):
    """A dataset is in none of the places searched; the message says where and how to get it."""


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST family, gzipped or not) as an array: images (N, H, W), labels (N,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read idx file ({err}); re-download or re-install it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = data[4 + 4 * ndim:]
    if len(payload) != expected:
        raise ValueError(f"{path}: idx header says {dims} ({expected} bytes) but {len(payload)} bytes follow; "
                         "the file is truncated")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dirs() -> list[Path]:
    """Folders searched for Fashion-MNIST, in order."""
    dirs = []
    if os.environ.get("SELFSUP_DATA"):
        base = Path(os.environ["SELFSUP_DATA"])
        dirs += [base / "fashion-mnist", base]
    dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def find_fashion_mnist(download_to: Path | None = None) -> Path:
    """The folder holding Fashion-MNIST's four idx files; downloads into ``download_to`` if given."""
    needed = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    for folder in fashion_mnist_dirs():
        if all(_find_idx(folder, s) for s in needed):
            return folder
    if download_to is None:
        looked = ", ".join(str(d) for d in fashion_mnist_dirs())
        raise DatasetNotFound(
            f"Fashion-MNIST not found (looked in {looked}). Install it with "
            "`sudo apt-get install dataset-fashion-mnist`, point $SELFSUP_DATA at a folder holding the four "
            "idx files, or pass --download.")
    download_to.mkdir(parents=True, exist_ok=True)
    for stem in needed:
        target = download_to / f"{stem}.gz"
        if target.exists():
            continue
        with urllib.request.urlopen(FASHION_MNIST_URL + target.name) as resp, open(f"{target}.part", "wb") as out:
            total = int(resp.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}") as bar:
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(f"{target}.part", target)
    return download_to


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def idx_samples(images_path: str | Path, labels_path: str | Path, prefix: str = "") -> tuple[Iterator[dict], int]:
    """Samples from an idx image/label pair, and their count."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")

    def gen():
        for i in range(len(images)):
            yield {"__key__": f"{prefix}{i:07d}", "png": encode_png(images[i]), "cls": int(labels[i])}

    return gen(), len(images)


def fashion_mnist_samples(split: str, folder: Path) -> tuple[Iterator[dict], int]:
    """Samples of one Fashion-MNIST split (``train`` or ``test``) and their count."""
    img, lab = FASHION_MNIST_FILES[split]
    return idx_samples(_find_idx(folder, img), _find_idx(folder, lab), prefix=f"fmnist-{split}-")


def image_folder_samples(root: str | Path) -> tuple[Iterator[dict], int, list[str]]:
    """Samples from ``root/<class>/<image>`` (any PIL-readable format), their count and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; lay it out as {root}/<class>/<image>")
    files = [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).rglob("*"))
             if p.suffix.lower() in IMAGE_SUFFIXES]

    def gen():
        for i, (path, c) in enumerate(files):
            data = path.read_bytes()
            if path.suffix.lower() != ".png":
                try:
                    data = encode_png(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                except OSError:
                    yield {"__key__": f"img-{i:08d}", "__error__": f"{path}: not a readable image"}
                    continue
            yield {"__key__": f"img-{i:08d}", "png": data, "cls": c}

    return gen(), len(files), classes


AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au"}


def _read_audio_labels(root: Path, labels_csv: Path) -> list[dict]:
    """Rows of ``labels_csv`` (a ``path`` column relative to ``root``, plus any others)."""
    import csv

    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{labels_csv}: needs a header with a 'path' column (path relative to {root})")
    return rows


def audio_label_classes(labels_csv: str | Path | None) -> list[str]:
    """Class names of a labels CSV's ``label`` column: 0..C-1 when every label is an integer, else sorted."""
    if labels_csv is None:
        return []
    rows = _read_audio_labels(Path(labels_csv).parent, Path(labels_csv))
    names = {r.get("label", "") for r in rows} - {""}
    if names and all(n.lstrip("-").isdigit() for n in names):
        return [str(c) for c in range(max(int(n) for n in names) + 1)]
    return sorted(names)


def audio_label_splits(labels_csv: str | Path | None) -> list[str]:
    """The values of a labels CSV's ``split`` column, sorted (empty without a CSV or the column)."""
    if labels_csv is None:
        return []
    rows = _read_audio_labels(Path(labels_csv).parent, Path(labels_csv))
    return sorted({r["split"] for r in rows if r.get("split")})


def _one_thread() -> None:
    """Pool initialiser: one torch thread per decoding process (the processes are the parallelism)."""
    import torch

    torch.set_num_threads(1)


def _audio_sample(job: tuple[int, str, str, dict]) -> dict:
    """Worker: (index, file, path as listed, metadata) -> a shard sample, or ``__error__`` naming the file."""
    from selfsup.audio.decode import SAMPLE_RATE, decode_audio, encode_flac

    index, file, shown, meta = job
    key = f"audio-{index:08d}"
    try:
        data = Path(file).read_bytes()
    except OSError as err:
        return {"__key__": key, "__error__": f"{shown}: cannot read ({err.strerror or err})"}
    try:
        wave, rate = decode_audio(data, shown)
    except ValueError as err:
        return {"__key__": key, "__error__": str(err)}
    info = {"duration": len(wave) / SAMPLE_RATE, "original_rate": rate, "path": shown, **meta}
    return {"__key__": key, "flac": encode_flac(wave), "json": info}


def audio_folder_samples(root: str | Path, labels_csv: str | Path | None = None, split: str | None = None,
                         processes: int = 2) -> tuple[Iterator[dict], int, list[str]]:
    """Samples from audio files under ``root`` (any layout, WAV/FLAC/OGG/MP3 at any rate), their count
    and class names.

    Without ``labels_csv`` every audio file under ``root`` is read (recursively). With it, the files are
    the CSV's ``path`` column (relative to ``root``), ``label`` becomes an integer class index and the
    other columns are kept in each sample's ``.json``; ``split`` keeps only rows of that split.
    Each file is decoded to 16 kHz mono (``decode_audio``) and stored as FLAC; a bad file (undecodable,
    silent, NaN, missing) yields ``{"__key__", "__error__"}`` so ``write_shards`` lists it as skipped.
    Decoding runs in a pool of ``processes`` (1: in this process).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"audio folder {root} does not exist")
    classes: list[str] = []
    if labels_csv is None:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        jobs = [(i, str(p), str(p.relative_to(root)), {}) for i, p in enumerate(files)]
    else:
        classes = audio_label_classes(labels_csv)
        index = {name: c for c, name in enumerate(classes)}
        jobs = []
        for i, row in enumerate(_read_audio_labels(root, Path(labels_csv))):
            if split is not None and row.get("split") != split:
                continue
            meta = {k: v for k, v in row.items() if k != "path" and k is not None}
            if meta.get("label", "") != "":
                meta["label"] = index[meta["label"]] if meta["label"] in index else index[str(int(meta["label"]))]
            jobs.append((i, str(root / row["path"]), row["path"], meta))
    if not jobs:
        raise ValueError(f"{root}: no audio files found (looked for {', '.join(sorted(AUDIO_SUFFIXES))})"
                         + (f" in split {split!r} of {labels_csv}" if split else ""))

    def gen():
        if processes <= 1:
            yield from map(_audio_sample, jobs)
            return
        import multiprocessing

        with multiprocessing.Pool(processes, initializer=_one_thread) as pool:
            yield from pool.imap(_audio_sample, jobs, chunksize=8)

    return gen(), len(jobs), classes
