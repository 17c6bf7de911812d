"""Audio bytes -> 16 kHz mono float32 waveform, and back to FLAC (for shards).

soundfile (libsndfile 1.2) reads WAV, FLAC, OGG/Vorbis and MP3 from memory; resampling uses
``torchaudio.functional.resample``.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from selfsup.config import MAX_AUDIO_SECONDS
from selfsup.core.messages import decoder_reason

SAMPLE_RATE = 16_000
SILENCE_PEAK = 1.0 / 32768  # below one 16-bit PCM step


def decode_audio(data: bytes, name: str, max_seconds: float = MAX_AUDIO_SECONDS) -> tuple[np.ndarray, int]:
    """Decode ``data`` (the file ``name``, used in errors) -> ((T,) float32 at 16 kHz, mono; original rate).

    Raises ValueError naming the file for undecodable bytes, a clip over ``max_seconds`` (its header's
    length, which bounds what soundfile reads), an empty clip, NaN/inf samples, or silence (peak below one
    16-bit step).
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames = f.samplerate, f.frames
            samples = f.read(dtype="float32", always_2d=True) if frames <= max_seconds * rate else None
    except Exception as exc:  # libsndfile raises several types (LibsndfileError, RuntimeError, TypeError)
        raise ValueError(f"{name}: cannot decode audio ({decoder_reason(exc)})") from exc
    if samples is None:
        raise ValueError(
            f"{name}: {frames / rate:.0f} s of audio, longer than data.max_audio_seconds={max_seconds:g}; "
            "not decoded (split it into shorter clips, or raise the cap)"
        )
    if samples.size == 0:
        raise ValueError(f"{name}: audio has no samples")
    if not np.isfinite(samples).all():
        raise ValueError(f"{name}: audio contains NaN or infinite samples")
    wave = samples.mean(axis=1)  # (T, channels) -> (T,)
    if np.abs(wave).max() < SILENCE_PEAK:
        raise ValueError(f"{name}: audio is silent (peak amplitude below {SILENCE_PEAK:g})")
    if rate != SAMPLE_RATE:
        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, SAMPLE_RATE).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32), int(rate)


def encode_flac(wave16k: np.ndarray) -> bytes:
    """(T,) float waveform at 16 kHz -> FLAC bytes (16-bit PCM, clipped to [-1, 1])."""
    buffer = io.BytesIO()
    sf.write(
        buffer, np.clip(np.asarray(wave16k, dtype=np.float32), -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16"
    )
    return buffer.getvalue()
