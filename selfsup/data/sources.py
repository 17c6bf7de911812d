"""Readers of real datasets, each yielding samples ready for ``shards.write_shards``.

A sample is a dict: ``{"__key__": str, "png" or "jpg": bytes, "cls": int}`` for images.
For audio: ``{"__key__": str, "flac": bytes (16 kHz mono), "json": {"duration", "original_rate", "path", ...}}``.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import os
import random
import struct
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from selfsup.config import MAX_IMAGE_PIXELS
from selfsup.core.messages import decoder_reason
from selfsup.core.progress import progress
from selfsup.errors import OneLineError

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

log = logging.getLogger("selfsup.data")

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFound(OneLineError, FileNotFoundError):
    """A dataset is in none of the places searched; the message says where and how to get it."""


class BadInput(OneLineError, ValueError):
    """A source or output path that ``shards write`` cannot use; the message names it and what to do."""


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST family, gzipped or not) as an array: images (N, H, W), labels (N,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise BadInput(f"{path}: cannot read idx file ({err}); re-download or re-install it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise BadInput(f"{path}: not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = data[4 + 4 * ndim :]
    if len(payload) != expected:
        raise BadInput(
            f"{path}: idx header says {dims} ({expected} bytes) but {len(payload)} bytes follow; the file is truncated"
        )
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
            "idx files, or pass --download."
        )
    download_to.mkdir(parents=True, exist_ok=True)
    if not all((download_to / f"{stem}.gz").exists() for stem in needed):
        log.info(
            "downloading Fashion-MNIST (4 gzipped idx files, about 30 MB) from %s to %s", FASHION_MNIST_URL, download_to
        )
    for stem in needed:
        target = download_to / f"{stem}.gz"
        if target.exists():
            continue
        with urllib.request.urlopen(FASHION_MNIST_URL + target.name) as resp, open(f"{target}.part", "wb") as out:
            total = int(resp.headers.get("Content-Length", 0)) or None
            with progress(total=total, unit="B", unit_scale=True, desc=f"download {target.name}") as bar:
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
        raise BadInput(f"{images_path}: expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise BadInput(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")

    def gen():
        for i in range(len(images)):
            yield {"__key__": f"{prefix}{i:07d}", "png": encode_png(images[i]), "cls": int(labels[i])}

    return gen(), len(images)


def fashion_mnist_samples(split: str, folder: Path) -> tuple[Iterator[dict], int]:
    """Samples of one Fashion-MNIST split (``train`` or ``test``) and their count."""
    img, lab = FASHION_MNIST_FILES[split]
    found = [_find_idx(folder, stem) for stem in (img, lab)]
    if found[0] is None or found[1] is None:
        raise DatasetNotFound(
            f"{folder} lacks {img if found[0] is None else lab} (or its .gz): not a whole Fashion-MNIST folder"
        )
    return idx_samples(found[0], found[1], prefix=f"fmnist-{split}-")


POOL_POLL_S = 0.5  # how long a wait for a pool's next result lasts before Ctrl-C is looked at again
MIN_SIDE = 8  # px: a smaller image (a 1x1 tracking pixel, a broken thumbnail) is skipped at write time
MIN_MAX_SIDE = 32  # px: the smallest ``max_side`` that `shards write image-folder --max-side` accepts
JPEG_QUALITY = 90  # of the JPEGs written when one must be re-encoded (FFCV's default)
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16/32-bit grey: stored 8-bit
_KEPT_MODES = ("L", "LA", "RGB", "RGBA")  # what every reader decodes as it is


def _check_decodes(img: Image.Image) -> None:
    """Decode ``img`` to the end of its data (a JPEG at 1/8 scale: its entropy-coded data is read whole,
    so a truncated or corrupt file fails, at a fraction of a full decode's cost)."""
    if img.format == "JPEG":
        img.draft(img.mode if img.mode in ("L", "RGB") else None, (img.width // 8, img.height // 8))
    img.load()


def _eight_bit(img: Image.Image) -> tuple[Image.Image, str | None]:
    """(``img`` in L, LA, RGB or RGBA, a note naming a lossy conversion (CMYK, 16-bit grey) or None)."""
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img, dtype=np.int64)
        shift = 8 if wide.max(initial=0) > 255 else 0
        return Image.fromarray((wide >> shift).clip(0, 255).astype(np.uint8)), f"{img.mode} grey converted to 8-bit"
    if img.mode in ("1", "P"):
        return img.convert(
            "RGBA" if img.mode == "P" and "transparency" in img.info else "L" if img.mode == "1" else "RGB"
        ), None
    if img.mode not in _KEPT_MODES:
        return img.convert("RGB"), f"{img.mode} converted to RGB"
    return img, None


def prepare_image(data: bytes, name: str, max_side: int | None = None) -> tuple[str, bytes, str | None]:
    """An image file's bytes as a shard stores them: (extension, bytes, a note when converted or None).

    A JPEG in L or RGB is kept byte for byte, a PNG in an 8-bit mode likewise; other formats are written
    as PNG; CMYK JPEGs and 16-bit grey are converted (JPEG stays JPEG, at ``JPEG_QUALITY``). With
    ``max_side``, an image whose long side exceeds it is resized to it (antialiased) and re-encoded.
    Raises ValueError naming ``name`` for an unreadable, truncated or too small (< ``MIN_SIDE``) image,
    and, without ``max_side``, for one over ``MAX_IMAGE_PIXELS`` (found from its header, not decoded).
    """
    try:
        with warnings.catch_warnings():  # PIL's warning of a large image: the cap below is selfsup's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
        (width, height), fmt, mode = img.size, img.format, img.mode
        over = width * height > MAX_IMAGE_PIXELS and not max_side
        if not over:
            _check_decodes(img)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError(f"{name}: not a readable image ({decoder_reason(err)})") from None
    if over:  # every reader would skip it (data.max_image_pixels)
        raise ValueError(
            f"{name}: {width}x{height} px ({width * height / 1e6:.1f} MP), over the "
            f"{MAX_IMAGE_PIXELS} pixels training decodes (data.max_image_pixels); pass --max-side "
            "to store it downscaled"
        )
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"{name}: {width}x{height} px, smaller than {MIN_SIDE} px on a side")
    too_big = bool(max_side and max(width, height) > max_side)
    if not too_big and ((fmt == "JPEG" and mode in ("L", "RGB")) or (fmt == "PNG" and mode in _KEPT_MODES)):
        return ("jpg" if fmt == "JPEG" else "png"), data, None
    img, note = _eight_bit(Image.open(io.BytesIO(data)))  # in full: the check may have decoded it reduced
    if too_big and max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    if fmt == "JPEG" and img.mode in ("L", "RGB"):
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return "jpg", buf.getvalue(), note
    img.save(buf, format="PNG", compress_level=1)
    return "png", buf.getvalue(), note


def _image_sample(job: tuple[int, str, int, int | None]) -> dict:
    """Worker: (index, file, class, max side) -> a shard sample naming its ``__source__`` file, or
    ``__error__`` naming the file."""
    index, file, cls, max_side = job
    key = f"img-{index:08d}"
    try:
        ext, data, note = prepare_image(Path(file).read_bytes(), file, max_side)
    except ValueError as err:
        return {"__key__": key, "__error__": str(err)}
    except OSError as err:
        return {"__key__": key, "__error__": f"{file}: cannot read ({err.strerror or err})"}
    sample = {"__key__": key, ext: data, "cls": cls, "__source__": file}
    return {**sample, "__converted__": f"{file}: {note}"} if note else sample


def image_folder_files(root: str | Path) -> tuple[list[tuple[int, str, int]], list[str]]:
    """(index, file, class index) of every image under ``root/<class>/`` (recursively, sorted), and the
    class names; raises DatasetNotFound or BadInput naming ``root`` when it is missing, flat or empty."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"image folder {root} does not exist; check the path")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise BadInput(
            f"{root} has no class sub-folders; lay it out as {root}/<class>/<image> "
            "(one folder per class, even for a single class)"
        )
    files = [
        (i, str(p), c)
        for i, (p, c) in enumerate(
            (p, c)
            for c, name in enumerate(classes)
            for p in sorted((root / name).rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES
        )
    ]
    if not files:
        raise BadInput(f"{root}: no images in its class folders (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, classes


SPLIT_SEED = 0  # `shards write image-folder --test-fraction`: the same files go to the test split every time


def stratified_split(
    files: list[tuple[int, str, int]],
    fraction: float,
    seed: int = SPLIT_SEED,
) -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
    """(train, test) of ``image_folder_files``' list: of each class's n files, ``round(fraction * n)``
    (halves up; at least 1 and at most n - 1 when n >= 2, none when n == 1) picked at random for test,
    by a generator seeded with ``seed`` and the class index (so one class's files move none of another's).
    Both keep the folder's order."""
    if not 0 < fraction < 1:
        raise BadInput(
            f"--test-fraction {fraction}: give a fraction between 0 and 1 (0.1 puts 10% of each class in OUT/test)"
        )
    by_class: dict[int, list[int]] = {}
    for i, (_, _, c) in enumerate(files):
        by_class.setdefault(c, []).append(i)
    test: set[int] = set()
    for c, members in by_class.items():
        n = len(members)
        k = 0 if n == 1 else min(n - 1, max(1, int(fraction * n + 0.5)))
        test.update(random.Random(seed * 1_000_003 + c).sample(members, k))
    return ([f for i, f in enumerate(files) if i not in test], [f for i, f in enumerate(files) if i in test])


def image_samples(
    files: list[tuple[int, str, int]],
    max_side: int | None = None,
    processes: int = 1,
) -> Iterator[dict]:
    """Shard samples of ``image_folder_files``' (index, file, class) list, in its order.

    Each image goes through ``prepare_image`` (decoded whole; JPEG bytes kept as they are; ``max_side``:
    larger images re-encoded at that long side); a bad one yields ``{"__key__", "__error__"}`` so
    ``write_shards`` lists it as skipped, a converted one carries ``__converted__``. ``processes``: checked
    in a pool of that many processes (1: in this process).
    """
    jobs = [(i, file, c, max_side) for i, file, c in files]
    if processes <= 1:
        yield from map(_image_sample, jobs)
        return
    yield from _pooled(_image_sample, jobs, processes, chunksize=16)


def image_folder_samples(
    root: str | Path,
    max_side: int | None = None,
    processes: int = 1,
) -> tuple[Iterator[dict], int, list[str]]:
    """Samples of every image under ``root/<class>/`` (``image_samples``), their count and the class names."""
    files, classes = image_folder_files(root)
    return image_samples(files, max_side, processes), len(files), classes


AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au"}


def _read_audio_labels(labels_csv: Path) -> list[dict]:
    """Rows of ``labels_csv`` (a ``path`` column relative to the audio folder, plus any others); raises
    BadInput naming the file when it is missing, unreadable or has no ``path`` column."""
    import csv

    try:
        with open(labels_csv, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except FileNotFoundError:
        raise BadInput(
            f"{labels_csv}: no such labels CSV; check --labels (a CSV with a 'path' column, "
            "paths relative to the audio folder)"
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BadInput(f"{labels_csv}: cannot read it as a CSV ({err}); check --labels") from None
    if "path" not in header:
        raise BadInput(
            f"{labels_csv}: needs a header with a 'path' column (paths relative to the audio folder); "
            f"its header is {header}"
        )
    return rows


def audio_label_classes(labels_csv: str | Path | None) -> list[str]:
    """Class names of a labels CSV's ``label`` column: 0..C-1 when every label is an integer, else sorted."""
    if labels_csv is None:
        return []
    rows = _read_audio_labels(Path(labels_csv))
    names = {r.get("label", "") for r in rows} - {""}
    if names and all(n.lstrip("-").isdigit() for n in names):
        return [str(c) for c in range(max(int(n) for n in names) + 1)]
    return sorted(names)


def audio_label_splits(labels_csv: str | Path | None) -> list[str]:
    """The values of a labels CSV's ``split`` column, sorted (empty without a CSV or the column)."""
    if labels_csv is None:
        return []
    rows = _read_audio_labels(Path(labels_csv))
    return sorted({r["split"] for r in rows if r.get("split")})


def _pooled(function, jobs: list, processes: int, chunksize: int, initializer=None) -> Iterator:
    """``function`` of each job, in order, from a pool of ``processes`` whose workers leave Ctrl-C to this
    process, which ends the pool (else a Ctrl-C, sent to the whole foreground group, prints each worker's
    traceback, or catches a worker mid-start and leaves the pool hanging). SIGINT is blocked while the
    workers are made: they inherit the block and ignore SIGINT before lifting it. Results are awaited
    ``POOL_POLL_S`` at a time: a Ctrl-C taken by another thread is raised here at the next wake."""
    import multiprocessing
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()  # the mask of this thread is the one forked
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if main else None
    try:
        pool = multiprocessing.Pool(processes, initializer=_quiet_worker, initargs=(initializer, os.getpid()))
    except BaseException:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    with pool:
        if mask is not None:  # this is the main thread
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C that came meanwhile is raised here
        chunks = [jobs[i : i + chunksize] for i in range(0, len(jobs), chunksize)]
        results = pool.imap(functools.partial(_map_chunk, function), chunks)  # one chunk a task: next(timeout)
        while True:
            try:
                yield from results.next(timeout=POOL_POLL_S)
            except multiprocessing.TimeoutError:
                continue
            except StopIteration:
                return


def _map_chunk(function, chunk: list) -> list:
    """Worker (:func:`_pooled`): ``function`` of each job of ``chunk``."""
    return [function(job) for job in chunk]


def _quiet_worker(initializer, parent: int) -> None:
    """Pool initialiser (:func:`_pooled`): ignore SIGINT, lift the block inherited from the parent, end
    with the parent (pid ``parent``) even when it is SIGKILLed, then ``initializer``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _end_with_parent(parent)
    if initializer is not None:
        initializer()


PR_SET_PDEATHSIG = 1  # prctl(2)


def _end_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux ``PR_SET_PDEATHSIG``): a SIGKILLed
    ``shards write`` runs no cleanup, and its pool workers would otherwise decode on, orphaned, until
    their jobs run out. Elsewhere nothing is done."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent ended before the request was in place
        os._exit(1)


def _one_thread() -> None:
    """Pool initialiser: one torch thread per decoding process (the processes are the parallelism)."""
    import torch

    torch.set_num_threads(1)


MIN_CLIP_SAMPLES = 400  # 25 ms at 16 kHz, one frame of wav2vec 2.0's conv stack (its receptive field): a shorter
# clip (a truncated file) gives no frame to any shipped config, and is skipped at write time


def _audio_sample(job: tuple[int, str, str, dict]) -> dict:
    """Worker: (index, file, path as listed, metadata) -> a shard sample naming its ``__source__`` file,
    or ``__error__`` naming the file (unreadable, undecodable, or shorter than ``MIN_CLIP_SAMPLES``)."""
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
    if len(wave) < MIN_CLIP_SAMPLES:
        return {
            "__key__": key,
            "__error__": f"{shown}: {1000 * len(wave) / SAMPLE_RATE:.1f} ms of audio, shorter "
            f"than {1000 * MIN_CLIP_SAMPLES / SAMPLE_RATE:g} ms (a truncated file?)",
        }
    info = {"duration": len(wave) / SAMPLE_RATE, "original_rate": rate, "path": shown, **meta}
    return {"__key__": key, "flac": encode_flac(wave), "json": info, "__source__": file}


def audio_folder_samples(
    root: str | Path, labels_csv: str | Path | None = None, split: str | None = None, processes: int = 2
) -> tuple[Iterator[dict], int, list[str]]:
    """Samples from audio files under ``root`` (any layout, WAV/FLAC/OGG/MP3 at any rate), their count
    and class names.

    Without ``labels_csv`` every audio file under ``root`` is read (recursively). With it, the files are
    the CSV's ``path`` column (relative to ``root``), ``label`` becomes an integer class index and the
    other columns are kept in each sample's ``.json``; ``split`` keeps only rows of that split.
    Each file is decoded to 16 kHz mono (``decode_audio``) and stored as FLAC; a bad file (undecodable,
    silent, NaN, missing, under ``MIN_CLIP_SAMPLES``) yields ``{"__key__", "__error__"}`` so
    ``write_shards`` lists it as skipped.
    Decoding runs in a pool of ``processes`` (1: in this process).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"audio folder {root} does not exist; check the path")
    classes: list[str] = []
    if labels_csv is None:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        jobs: list[tuple[int, str, str, dict]] = [
            (i, str(p), str(p.relative_to(root)), {}) for i, p in enumerate(files)
        ]
    else:
        classes = audio_label_classes(labels_csv)
        index = {name: c for c, name in enumerate(classes)}
        jobs = []
        for i, row in enumerate(_read_audio_labels(Path(labels_csv))):
            if split is not None and row.get("split") != split:
                continue
            meta = {k: v for k, v in row.items() if k != "path" and k is not None}
            if meta.get("label", "") != "":
                meta["label"] = index[meta["label"]] if meta["label"] in index else index[str(int(meta["label"]))]
            jobs.append((i, str(root / row["path"]), row["path"], meta))
    if not jobs:
        raise BadInput(
            f"{root}: no audio files found (looked for {', '.join(sorted(AUDIO_SUFFIXES))})"
            + (f" in split {split!r} of {labels_csv}" if split else "")
        )

    def gen():
        if processes <= 1:
            yield from map(_audio_sample, jobs)
            return
        yield from _pooled(_audio_sample, jobs, processes, chunksize=8, initializer=_one_thread)

    return gen(), len(jobs), classes
