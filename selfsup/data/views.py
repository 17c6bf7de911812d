"""Views cut from the whole original image, for shards of images of many sizes (ImageNet).

Each view's random-resized-crop box is drawn per sample in the image's own pixels, by torchvision's
rule (``selfsup.vision.augment.crop_boxes``: scale, log-ratio, 10 tries, centre-crop fall-back), then
the box is cut and resized to its view's size: ``data.image_size``, or a local crop's smaller size
(multi-crop); a small image is upsampled, as torchvision does. Flip, jitter, grey, blur and solarize
follow batched on the training device (``BatchViews.cropped``).

The boxes are drawn in the loader workers by ``BoxSampler``, whichever way they are cut, so both ways
give one distribution:

- CPU (``data.decode: cpu``): the worker decodes the image, a JPEG at the smallest DCT scale that still
  gives every box ``size`` pixels a side (PIL's ``draft``), and cuts each box with PIL's antialiased
  bilinear resize, as torchvision's ``RandomResizedCrop`` does on a PIL image.
- device (``data.decode: gpu``): the worker only reads the bytes and draws the boxes; ``DeviceCrops``
  decodes the batch's JPEGs on the device (nvJPEG: ``torchvision.io.decode_jpeg(..., device="cuda")``)
  and cuts every box with ``roi_align`` over its own image (images grouped by size). A PNG, a CMYK or
  a progressive JPEG is cut by the worker instead; a JPEG the device decoder rejects is decoded on the
  CPU, counted in the data health and logged, never a crash. The device's own failures (out of memory,
  a CUDA error) are never taken for a bad JPEG: they stop the run with ``DeviceDecodeError``, one line.

The views are grouped by size (``size_groups``: the global views, then each local size), V_g views
at S_g px in group g. A batch (``collate_views``) of B samples:
``{"labels": int64 (B,), "crops": [uint8 (V_g, K, C, S_g, S_g)] per group, cut by the workers,
"crop_index": int64 (K,) their places in the batch, "jpeg": uint8 (all J JPEGs' bytes,),
"jpeg_offsets": int64 (J + 1,), "boxes": float32 (J, V, 4) [x1, y1, x2, y2] in each JPEG's pixels,
"jpeg_index": int64 (J,), "keys": [J]}``.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections import OrderedDict, defaultdict
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.ops import roi_align

from selfsup.config import MAX_IMAGE_PIXELS
from selfsup.core.messages import decoder_reason
from selfsup.data.decode import image_payload, open_image
from selfsup.data.stream import DataHealth
from selfsup.errors import OneLineError
from selfsup.vision.augment import crop_boxes

log = logging.getLogger("selfsup.data")

Crop = tuple[tuple[float, float], tuple[float, float]]  # (scale, ratio) of one view's RandomResizedCrop


class BoxSampler:
    """Random-resized-crop boxes, one per view: ``(width, height) -> float32 (V, 4)`` [x1, y1, x2, y2].

    Boxes are drawn by ``crop_boxes`` in blocks of ``block`` per image size (torch's global RNG, which
    the DataLoader seeds per worker), and handed out one by one: each is an independent draw of
    torchvision's rule for its image's size, at a few microseconds a box instead of a dozen tensor
    ops a sample. The blocks of the ``sizes`` most recently seen image sizes are kept.
    """

    def __init__(self, crops: list[Crop], block: int = 256, sizes: int = 1024):
        self.crops, self.block, self.sizes = list(crops), block, sizes
        self.pending: OrderedDict[tuple[int, int], tuple[torch.Tensor, int]] = OrderedDict()

    def __call__(self, width: int, height: int) -> torch.Tensor:
        pending = self.pending.pop((width, height), None)
        if pending is None or pending[1] >= self.block:
            boxes, used = torch.stack([crop_boxes(self.block, height, width, s, r) for s, r in self.crops], 1), 0
        else:
            boxes, used = pending
        self.pending[(width, height)] = (boxes, used + 1)
        if len(self.pending) > self.sizes:
            self.pending.popitem(last=False)
        return boxes[used]


def size_groups(sizes: list[int]) -> list[tuple[int, slice]]:
    """The runs of consecutive views of one size: [(size, slice of the views)], in view order."""
    groups: list[tuple[int, slice]] = []
    for i, size in enumerate(sizes):
        if groups and groups[-1][0] == size:
            groups[-1] = (size, slice(groups[-1][1].start, i + 1))
        else:
            groups.append((size, slice(i, i + 1)))
    return groups


def device_decodable(img: Image.Image) -> bool:
    """Whether nvJPEG is expected to decode ``img`` (an opened, not yet decoded PIL image): a baseline
    JPEG in L or RGB (YCbCr). Everything else is cut by the loader worker."""
    return img.format == "JPEG" and img.mode in ("L", "RGB") and not img.info.get("progressive")


def cut_views(img: Image.Image, boxes: torch.Tensor, sizes: list[int], mode: str) -> list[torch.Tensor]:
    """Each box of an opened PIL image, resized to its view's size: float (V, 4) -> [uint8 (V_g, C, S_g, S_g)]
    per group of ``size_groups(sizes)``.

    A JPEG is decoded at the smallest DCT scale (1/8 to 1) that leaves every box at least its view's
    size a side (PIL's ``draft``); ``mode``: "L" or "RGB". PIL's errors pass through.
    """
    width, height = img.size
    shortest = (boxes[:, 2:] - boxes[:, :2]).min(1).values.clamp(min=1.0)
    scale = float((torch.tensor(sizes, dtype=shortest.dtype) / shortest).max())
    if img.format == "JPEG" and scale < 1:
        img.draft(mode, (math.ceil(width * scale), math.ceil(height * scale)))
    img.load()
    img = img if img.mode == mode else img.convert(mode)
    sx, sy = img.width / width, img.height / height
    crops = [
        torch.from_numpy(
            np.array(img.resize((size, size), Image.Resampling.BILINEAR, box=(a * sx, b * sy, c * sx, d * sy)))
        )
        for (a, b, c, d), size in zip(boxes.tolist(), sizes)
    ]
    crops = [c.unsqueeze(0) if c.ndim == 2 else c.permute(2, 0, 1) for c in crops]
    return [torch.stack(crops[views]) for _, views in size_groups(sizes)]


class ViewItem(NamedTuple):
    """One decoded sample: its views' ``crops`` [uint8 (V_g, C, S_g, S_g)] per size group, cut by the
    worker, or its ``jpeg`` bytes uint8 (N,) with their ``boxes`` float32 (V, 4) for the device to cut."""

    label: int
    key: str
    crops: list[torch.Tensor] | None = None
    jpeg: torch.Tensor | None = None
    boxes: torch.Tensor | None = None


class WholeImageViews:
    """The loader workers' decode for views from the whole image: a raw sample -> ``ViewItem``.

    ``crops``: each view's (scale, ratio); ``sizes``: each view's side in pixels (the global views first,
    then the local ones by size); ``on_device``: leave the JPEGs nvJPEG can decode to
    ``DeviceCrops`` (``data.decode: gpu``). Raises ValueError naming the key for a bad sample, which
    the stream skips and counts.
    """

    def __init__(
        self,
        crops: list[Crop],
        sizes: list[int],
        channels: int,
        on_device: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels}: views of images of many sizes need 1 or 3 channels")
        self.boxes, self.sizes, self.on_device = BoxSampler(crops), sizes, on_device
        self.mode, self.max_pixels = "L" if channels == 1 else "RGB", max_pixels

    def __call__(self, sample: dict) -> ViewItem:
        key = sample.get("__key__", "?")
        img, label = open_image(sample, self.max_pixels)
        data = image_payload(sample)[0]
        try:
            boxes = self.boxes(*img.size)
            if self.on_device and device_decodable(img):
                return ViewItem(label, key, jpeg=torch.frombuffer(bytearray(data), dtype=torch.uint8), boxes=boxes)
            return ViewItem(label, key, crops=cut_views(img, boxes, self.sizes, self.mode))
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise ValueError(f"sample {key}: undecodable ({decoder_reason(err)})") from None


def collate_views(items: list[ViewItem]) -> dict:
    """[ViewItem] * B -> the batch dict of the module docstring."""
    cut = [i for i, it in enumerate(items) if it.crops is not None]
    enc = [i for i, it in enumerate(items) if it.crops is None]
    crops = [it.crops for it in items if it.crops is not None]
    jpegs = [it.jpeg for it in items if it.crops is None and it.jpeg is not None]
    boxes = [it.boxes for it in items if it.crops is None and it.boxes is not None]
    if len(jpegs) != len(enc) or len(boxes) != len(enc):
        raise ValueError("a ViewItem without crops needs its jpeg and boxes")
    lengths = torch.tensor([0] + [len(jpeg) for jpeg in jpegs], dtype=torch.int64)
    return {
        "labels": torch.tensor([it.label for it in items], dtype=torch.int64),
        "crops": [torch.stack(group, 1) for group in zip(*crops)],
        "crop_index": torch.tensor(cut, dtype=torch.int64),
        "jpeg": torch.cat(jpegs) if enc else torch.empty(0, dtype=torch.uint8),
        "jpeg_offsets": lengths.cumsum(0),
        "boxes": torch.stack(boxes) if enc else torch.empty(0, 0, 4),
        "jpeg_index": torch.tensor(enc, dtype=torch.int64),
        "keys": [items[i].key for i in enc],
    }


class DeviceDecodeError(OneLineError, RuntimeError):
    """The device, not a JPEG, failed to decode or cut a batch (out of memory, a CUDA error, no nvJPEG)."""


def device_failure(err: BaseException) -> bool:
    """Whether ``err`` is the device's own (out of memory, a CUDA error) rather than a bad JPEG's."""
    text = str(err)
    return isinstance(err, (torch.OutOfMemoryError, torch.AcceleratorError)) or any(
        s in text for s in ("out of memory", "CUDA error", "ALLOCATOR_FAILURE")
    )


@functools.cache
def nvjpeg_problem(device: torch.device) -> str | None:
    """Why this torchvision cannot decode a JPEG on ``device`` (one line), or None when it can."""
    tiny = encode_jpeg(torch.zeros((3, 8, 8), dtype=torch.uint8))
    try:
        decode_jpeg(tiny, device=device)
    except RuntimeError as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _power_of_two(n: int) -> bool:
    """Whether the n-th occurrence is logged (1st, 2nd, 4th, 8th, ...)."""
    return n & (n - 1) == 0


def _on(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor on ``device`` without making the host wait for the device (pinned, asynchronous)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def cut_boxes(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's V boxes resized to ``size``, by roi_align over the image's own extent (images of one
    size in one call; adaptive sampling, so a large box is averaged as an antialiased resize would):
    [uint8 (C, H_i, W_i)] * N, float (N, V, 4) -> float (V, N, C, size, size) in [0, 1]."""
    n, v = boxes.shape[:2]
    c = images[0].shape[0]
    out = torch.empty((v, n, c, size, size), device=boxes.device)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[(image.shape[1], image.shape[2])].append(i)
    for members in groups.values():
        index = _on(boxes.device, torch.tensor(members))
        stack = torch.stack([images[i] for i in members]).float().div_(255)
        owner = torch.arange(len(members), device=boxes.device, dtype=torch.float32).repeat_interleave(v)
        rois = torch.cat([owner.unsqueeze(1), boxes[index].reshape(-1, 4)], 1)
        crops = roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        out[:, index] = crops.view(len(members), v, c, size, size).transpose(0, 1)
    return out.clamp_(0, 1)


class DeviceCrops:
    """A ``collate_views`` batch -> its views' crops on ``device``: [float (V_g, B, C, S_g, S_g)] in [0, 1]
    per group of ``size_groups(sizes)``, ``sizes`` each view's side in pixels.

    The workers' crops are copied over; the JPEGs are decoded on ``device`` (nvJPEG on CUDA, a batch
    at a time) and cut by ``cut_boxes``. A JPEG the device rejects is decoded by PIL instead
    (``health.decode_fallbacks``); one nothing decodes becomes a grey image (``health.decode_failed``);
    both are logged by key (the 1st, 2nd, 4th, ... of each). ``health``: the loop's ``DataHealth``.
    Out of memory or a CUDA error raises ``DeviceDecodeError`` naming the settings to change.
    On CUDA the work is queued on a side stream, which the training stream waits for: the host queues
    the next batch's decoding while the GPU still runs the previous step, and the two can overlap.
    """

    def __init__(self, sizes: list[int], channels: int, device: torch.device, health: DataHealth | None = None):
        self.groups, self.device = size_groups(sizes), torch.device(device)
        self.read_mode, self.pil_mode = (ImageReadMode.GRAY, "L") if channels == 1 else (ImageReadMode.RGB, "RGB")
        self.health = DataHealth() if health is None else health
        self.stream: torch.cuda.Stream | None = None

    def __call__(self, batch: dict) -> list[torch.Tensor]:
        try:
            if self.device.type != "cuda":
                return self.crops(batch)
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
            side, main = self.stream, torch.cuda.current_stream(self.device)
            with torch.cuda.stream(side):
                out = self.crops(batch)
            main.wait_stream(side)
            for group in out:
                group.record_stream(main)  # made on the side stream, read and freed on the training stream
            return out
        except RuntimeError as err:
            if not device_failure(err):
                raise
            what = (
                "ran out of memory"
                if "out of memory" in str(err) or isinstance(err, torch.OutOfMemoryError)
                else f"failed ({type(err).__name__}: {str(err).splitlines()[0]})"
            )
            raise DeviceDecodeError(
                f"decoding a batch of {len(batch['jpeg_index'])} JPEGs on {self.device} {what}: set data.decode=cpu "
                "to decode in the loader workers, or lower data.batch_size"
            ) from None

    def crops(self, batch: dict) -> list[torch.Tensor]:
        """[float (V_g, B, C, S_g, S_g)] on the device, queued on the current stream."""
        parts = []
        if len(batch["crop_index"]):
            parts.append(
                (batch["crop_index"], [torch.div(g.to(self.device, non_blocking=True), 255) for g in batch["crops"]])
            )
        if len(batch["jpeg_index"]):
            parts.append((batch["jpeg_index"], self.cut_jpegs(batch)))
        if len(parts) == 1 and torch.equal(parts[0][0], torch.arange(len(batch["labels"]))):
            return parts[0][1]  # all cut one way, in order
        out = []
        for g in range(len(self.groups)):
            v, _, c, s, _ = parts[0][1][g].shape
            out.append(torch.empty((v, len(batch["labels"]), c, s, s), device=self.device))
            for index, crops in parts:
                out[g][:, index.to(self.device, non_blocking=True)] = crops[g]
        return out

    def cut_jpegs(self, batch: dict) -> list[torch.Tensor]:
        """[float (V_g, J, C, S_g, S_g)]: the batch's JPEGs decoded on the device and cut."""
        offsets = batch["jpeg_offsets"].tolist()
        data = [batch["jpeg"][a:b] for a, b in zip(offsets, offsets[1:])]
        boxes = batch["boxes"].to(self.device, non_blocking=True)
        try:
            images = decode_jpeg(data, mode=self.read_mode, device=self.device)
        except (RuntimeError, ValueError) as err:  # one bad JPEG fails the whole batched call: one by one
            if device_failure(err):
                raise
            images = [self.decode_one(d, k, b) for d, k, b in zip(data, batch["keys"], batch["boxes"])]
        return [cut_boxes(images, boxes[:, views], size) for size, views in self.groups]

    def decode_one(self, data: torch.Tensor, key: str, boxes: torch.Tensor) -> torch.Tensor:
        """One JPEG -> uint8 (C, H, W) on the device: nvJPEG, else PIL, else grey over its ``boxes``' extent."""
        try:
            return decode_jpeg(data, mode=self.read_mode, device=self.device)
        except (RuntimeError, ValueError) as err:
            if device_failure(err):
                raise
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        try:
            img = Image.open(io.BytesIO(data.numpy().tobytes())).convert(self.pil_mode)
            array = torch.from_numpy(np.asarray(img).copy())
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
            self.health.decode_failed += 1
            if _power_of_two(self.health.decode_failed):
                log.warning(
                    "sample %s: undecodable (%s: %s), its views are grey (%d so far)",
                    key,
                    type(err).__name__,
                    err,
                    self.health.decode_failed,
                )
            c = 1 if self.pil_mode == "L" else 3
            h, w = math.ceil(float(boxes[:, 3].max())), math.ceil(float(boxes[:, 2].max()))
            return torch.full((c, max(h, 1), max(w, 1)), 128, dtype=torch.uint8, device=self.device)
        self.health.decode_fallbacks += 1
        if _power_of_two(self.health.decode_fallbacks):
            log.warning(
                "sample %s: the device could not decode it (%s), decoded on the CPU (%d so far)",
                key,
                reason,
                self.health.decode_fallbacks,
            )
        return (array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)).to(self.device)
