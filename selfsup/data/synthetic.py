"""An ImageNet-like JPEG folder made on the fly, for tests and benchmarks (nothing is downloaded).

``write_imagenet_like(root, n, classes=4)`` writes ``root/<class>/<class>_<i>.JPEG``, a folder that
``selfsup shards write image-folder`` (and torchvision's ``ImageFolder``) reads:

- **Sizes** follow the shape of ImageNet's (ILSVRC-2012 train) size histogram: 500x375 (40%), 375x500
  (15%), 500x333 (12%), 333x500 (4%), 500x500 (4%), and 25% other sizes, their area log-uniform from 0.1
  to 1 megapixel and their aspect log-uniform from 1:2 to 2:1 (316 to 1414 px a side). The shares are
  rounded, not measured on ImageNet itself.
- **Content** is natural-image-like, not white noise: a smooth random colour field with a roughly 1/f
  spectrum (Gaussian noise at 5 octaves, each upsampled bicubically), a few sharp-edged shapes over it,
  low-frequency shading across everything, and a fine texture (band-limited noise and grain), so that a
  500x375 JPEG is about 70 KB (ImageNet's files average about 110 KB) and decodes at a photo's cost.
- **Classes**: each has its own hue band and its own kind of shape (ellipses, polygons, bars), so the
  classes can be told apart.
- **Encoding**: baseline JPEG, quality 90, 4:2:0 chroma (PIL's default), which nvJPEG decodes.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COMMON_SIZES = ((500, 375, 0.40), (375, 500, 0.15), (500, 333, 0.12), (333, 500, 0.04), (500, 500, 0.04))
QUALITY = 90


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """A (width, height) drawn from the module docstring's size distribution."""
    u = rng.random()
    for w, h, p in COMMON_SIZES:
        if u < p:
            return w, h
        u -= p
    area = math.exp(rng.uniform(math.log(1e5), math.log(1e6)))
    aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
    return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))


def _resized(plane: np.ndarray, width: int, height: int, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """A float32 (h, w) plane resized to (height, width) (PIL, so that no thread pool is forked)."""
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((width, height), resample))


def _field(
    rng: np.random.Generator, width: int, height: int, channels: int, octaves: int = 5, decay: float = 0.6
) -> np.ndarray:
    """A smooth random field: float32 (channels, height, width) of about unit spread, octave k (2**(k+1)
    cells across the long side) weighted decay**k; built at a quarter of the size, then upsampled."""
    sw, sh = max(2, width // 4), max(2, height // 4)
    total = np.zeros((channels, sh, sw), np.float32)
    for k in range(octaves):
        cells = 2 ** (k + 1)
        gh, gw = (max(2, round(cells * side / max(width, height))) + 1 for side in (height, width))
        noise = rng.standard_normal((channels, gh, gw))
        total += decay**k * np.stack([_resized(n, sw, sh) for n in noise])
    full = np.stack([_resized(t, width, height, Image.Resampling.BILINEAR) for t in total])
    return full / math.sqrt(sum(decay ** (2 * k) for k in range(octaves)))


def _colour(rng: np.random.Generator, hue: float) -> tuple[int, int, int]:
    """An RGB colour near ``hue`` (in turns)."""
    r, g, b = colorsys.hsv_to_rgb((hue + rng.normal(0, 0.04)) % 1.0, rng.uniform(0.3, 0.9), rng.uniform(0.25, 0.95))
    return round(r * 255), round(g * 255), round(b * 255)


def _shapes(img: Image.Image, rng: np.random.Generator, kind: int, hue: float) -> None:
    """3 to 8 sharp-edged shapes of one ``kind`` (0 ellipses, 1 polygons, 2 bars), drawn on ``img``."""
    draw, (w, h) = ImageDraw.Draw(img), img.size
    for _ in range(rng.integers(3, 9)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.35) * min(w, h)
        colour = _colour(rng, hue + 0.5 * rng.integers(0, 2))
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)], fill=colour)
        elif kind == 1:
            angles = np.sort(rng.uniform(0, 2 * math.pi, rng.integers(3, 6)))
            draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=colour)
        else:
            a = rng.uniform(0, math.pi)
            draw.line(
                [
                    (cx - 2 * r * math.cos(a), cy - 2 * r * math.sin(a)),
                    (cx + 2 * r * math.cos(a), cy + 2 * r * math.sin(a)),
                ],
                fill=colour,
                width=max(2, int(r / 3)),
            )


def natural_image(rng: np.random.Generator, width: int, height: int, cls: int, classes: int) -> np.ndarray:
    """One image of class ``cls``: uint8 (height, width, 3) (see the module docstring)."""
    hue = cls / classes
    base = np.array(colorsys.hsv_to_rgb(hue, 0.45, 0.55), dtype=np.float32).reshape(3, 1, 1) * 255
    pixels = base + 45 * _field(rng, width, height, 3)
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8).transpose(1, 2, 0))
    _shapes(img, rng, cls % 3, hue)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    x = x * (1 + 0.25 * _field(rng, width, height, 1, octaves=3))  # shading across shapes and background
    fine = rng.standard_normal((max(2, height // 2), max(2, width // 2)))
    x = x + 16 * _resized(fine, width, height, Image.Resampling.BILINEAR)  # texture
    x = x + rng.normal(0, 6, (1, height, width)).astype(np.float32)  # sensor grain
    return x.clip(0, 255).round().astype(np.uint8).transpose(1, 2, 0)


def _write_one(job: tuple[str, int, int, int, int]) -> str:
    path, cls, classes, seed, index = job
    rng = np.random.default_rng([seed, index])
    width, height = imagenet_like_size(rng)
    Image.fromarray(natural_image(rng, width, height, cls, classes)).save(path, format="JPEG", quality=QUALITY)
    return path


def write_imagenet_like(root: str | Path, n: int, classes: int = 4, seed: int = 0, processes: int = 1) -> list[Path]:
    """Write ``n`` ImageNet-like JPEGs as ``root/<class>/<class>_<i>.JPEG`` (classes ``c0``, ``c1``, ...,
    taking turns); returns their paths. The same ``seed`` gives the same files. ``processes``: a pool."""
    root = Path(root)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(root / f"c{i % classes}" / f"c{i % classes}_{i:06d}.JPEG"), i % classes, classes, seed, i)
        for i in range(n)
    ]
    if processes <= 1:
        return [Path(p) for p in map(_write_one, jobs)]
    import multiprocessing

    with multiprocessing.Pool(processes) as pool:
        return [Path(p) for p in pool.imap(_write_one, jobs, chunksize=8)]
