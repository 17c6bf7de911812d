"""Raw shard samples -> tensors, and lists of them -> batches.

A decoder raises ValueError naming the sample's key for a bad sample, which every reader counts and
skips (``ShardStream``, ``verify_shards``, ``read_split``). An image sample holds its encoded image
under one of ``IMAGE_KEYS`` (a JPEG as ``.jpg``, as written; anything else as ``.png``) and ``.cls``.
An image over ``max_pixels`` (``data.max_image_pixels``, read from its header) is refused before
anything is decoded.
"""

from __future__ import annotations

import io
import json
import random
import warnings

import numpy as np
import torch

from selfsup.config import MAX_AUDIO_SECONDS, MAX_IMAGE_PIXELS
from selfsup.core.messages import decoder_reason
from selfsup.data.reader import DUPLICATE

IMAGE_KEYS = ("jpg", "jpeg", "png")


def refuse_duplicate(sample: dict) -> None:
    """Raise ValueError naming the key when ``read_shard`` marked ``sample`` as a repeated key."""
    if DUPLICATE in sample:
        raise ValueError(f"sample {sample.get('__key__', '?')}: {sample[DUPLICATE]}")


def image_payload(sample: dict) -> tuple[bytes, int]:
    """A raw image sample's (encoded image bytes, label); raises ValueError naming the key."""
    refuse_duplicate(sample)
    key = sample.get("__key__", "?")
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None or "cls" not in sample:
        raise ValueError(
            f"sample {key}: needs .jpg or .png and .cls, has {sorted(k for k in sample if not k.startswith('__'))}"
        )
    try:
        return data, int(sample["cls"])
    except ValueError:
        raise ValueError(f"sample {key}: its .cls {sample['cls'][:20]!r} is not an integer") from None


def open_image(sample: dict, max_pixels: int = MAX_IMAGE_PIXELS):
    """A raw image sample's (PIL image with only its header read, label); raises ValueError naming the
    key and the cause for an unreadable header or more than ``max_pixels`` pixels."""
    from PIL import Image

    key = sample.get("__key__", "?")
    data, label = image_payload(sample)
    try:
        with warnings.catch_warnings():  # PIL warns of images over its own limit: ours is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ValueError(f"sample {key}: too large to decode ({err}); skipped") from None
    except Exception as err:  # PIL raises many types for bad bytes
        raise ValueError(f"sample {key}: unreadable image header ({decoder_reason(err)})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ValueError(
            f"sample {key}: {width}x{height} px ({width * height / 1e6:.1f} MP) is over "
            f"data.max_image_pixels={max_pixels}, not decoded (downscale it, or raise the cap)"
        )
    return img, label


def decode_sample(sample: dict, kind: str, max_pixels: int = MAX_IMAGE_PIXELS, max_seconds: float = MAX_AUDIO_SECONDS):
    """Decode one raw sample's payload: (uint8 image array, label) for "image" (at most ``max_pixels``),
    ((float32 (T,) 16 kHz waveform, original rate), its .json dict) for "audio" (at most ``max_seconds``);
    raises ValueError naming the key when it is bad."""
    key = sample.get("__key__", "?")
    if kind == "image":
        img, label = open_image(sample, max_pixels)
        try:
            return np.asarray(img), label
        except Exception as err:  # PIL raises many types for bad bytes
            raise ValueError(f"sample {key}: undecodable ({decoder_reason(err)})") from None
    if kind == "audio":
        from selfsup.audio.decode import decode_audio  # torchaudio loads only for audio data

        refuse_duplicate(sample)
        if "flac" not in sample or "json" not in sample:
            raise ValueError(f"sample {key}: needs .flac and .json")
        return decode_audio(sample["flac"], f"sample {key}", max_seconds), json.loads(sample["json"])
    raise ValueError(f"unknown sample format {kind!r}")


def decode_image(
    sample: dict, channels: int, size: int | None, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor, int]:
    """A raw image sample -> (uint8 (C, size, size), label): its short side resized to ``size``, then
    centre-cropped (``size`` None: uint8 (C, H, W) at its own size); raises ValueError naming the key."""
    from torchvision.transforms.v2 import functional as TF

    img, label = decode_sample(sample, "image", max_pixels)
    t = torch.from_numpy(np.array(img))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != channels:
        if channels == 1:
            t = t[:3].float().mean(0, keepdim=True).round().to(torch.uint8) if t.shape[0] >= 3 else t[:1]
        elif t.shape[0] == 1:
            t = t.expand(channels, -1, -1)
        else:
            t = t[:channels]
    if size is not None and (t.shape[1] != size or t.shape[2] != size):
        t = TF.center_crop(TF.resize(t, size, antialias=True), [size, size])
    return t.contiguous(), label


def decode_native(
    sample: dict, channels: int, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor, int]:
    """A raw image sample of the one size ``width`` x ``height`` that a shard folder holds -> (uint8
    (C, height, width), label); raises ValueError naming the key for one of another size."""
    image, label = decode_image(sample, channels, None, max_pixels)
    if image.shape[1:] != (height, width):
        raise ValueError(
            f"sample {sample.get('__key__', '?')}: {image.shape[2]}x{image.shape[1]} px, not the "
            f"{width}x{height} the manifest lists for every image"
        )
    return image, label


def collate_images(items: list[tuple[torch.Tensor, int]]) -> dict:
    """[(uint8 (C, H, W), label)] -> {"images": uint8 (B, C, H, W), "labels": int64 (B,)}."""
    return {"images": torch.stack([i[0] for i in items]), "labels": torch.tensor([i[1] for i in items])}


def decode_audio_sample(
    sample: dict, min_samples: int, max_seconds: float = MAX_AUDIO_SECONDS
) -> tuple[torch.Tensor, int]:
    """A raw audio sample -> (float32 (T,) 16 kHz waveform, label or -1); raises ValueError naming the
    key for a bad clip, one shorter than ``min_samples`` or longer than ``max_seconds`` (so the stream
    skips and counts it)."""
    (wave, _), info = decode_sample(sample, "audio", max_seconds=max_seconds)
    if len(wave) < min_samples:
        raise ValueError(
            f"sample {sample.get('__key__', '?')}: {len(wave)} samples, shorter than the "
            f"minimum {min_samples} (data.min_seconds or the receptive field)"
        )
    label = info.get("label", -1)
    return torch.from_numpy(wave), int(label) if label not in ("", None) else -1


def collate_audio(
    items: list[tuple[torch.Tensor, int]], max_samples: int, min_samples: int, rng: random.Random | None = None
) -> dict:
    """[(float32 (T_i,), label)] -> {"waves": float32 (B, S), "lengths": int64 (B,), "labels": int64 (B,)}.

    As fairseq batches without padding: every clip is randomly cropped to S = min(shortest T_i,
    ``max_samples``). ``rng`` picks the crop offsets (default: Python's ``random``, which torch seeds
    per DataLoader worker).
    """
    randrange = rng.randrange if rng is not None else random.randrange
    size = min(min(len(w) for w, _ in items), max_samples)
    if size < min_samples:
        raise ValueError(f"a clip of {size} samples reached collate_audio; decode must drop clips under {min_samples}")
    crops = []
    for wave, _ in items:
        start = randrange(len(wave) - size + 1)
        crops.append(wave[start : start + size])
    return {
        "waves": torch.stack(crops),
        "lengths": torch.full((len(items),), size, dtype=torch.int64),
        "labels": torch.tensor([label for _, label in items], dtype=torch.int64),
    }
