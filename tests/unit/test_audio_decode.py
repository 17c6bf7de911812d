"""decode_audio / encode_flac on tiny synthetic clips made with soundfile."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from selfsup.audio.decode import SAMPLE_RATE, decode_audio, encode_flac


def _encode(wave: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _dominant_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)[spectrum.argmax()])


def _sine(rate: int, seconds: float, hz: float, channels: int) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.4 * np.sin(2 * np.pi * hz * t)
    return np.stack([mono] * channels, axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("WAV", "PCM_16", 44100, 2),
        ("FLAC", "PCM_16", 22050, 1),
        ("OGG", "VORBIS", 48000, 2),
        ("MP3", "MPEG_LAYER_III", 44100, 1),
        ("WAV", "FLOAT", 16000, 1),
    ],
)
def test_decodes_to_16k_mono_keeping_length_and_pitch(fmt, subtype, rate, channels):
    data = _encode(_sine(rate, 0.5, 440.0, channels), rate, fmt, subtype)
    wave, original_rate = decode_audio(data, f"clip.{fmt.lower()}")
    assert original_rate == rate
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SAMPLE_RATE // 2) <= 0.01 * SAMPLE_RATE  # MP3 adds encoder padding
    assert abs(_dominant_hz(wave) - 440.0) < 10.0
    assert 0.2 < np.abs(wave).max() < 0.6


def test_downmixes_channels():
    wave = _sine(16000, 0.25, 300.0, 2)
    wave[:, 1] = -wave[:, 0] * 0.5  # mean of the channels is 0.25 * the first
    decoded, _ = decode_audio(_encode(wave, 16000, "WAV", "FLOAT"), "stereo.wav")
    np.testing.assert_allclose(decoded, wave[:, 0] * 0.25, atol=1e-6)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"definitely not audio", "cannot decode"),
        (_encode(np.zeros(8000, np.float32), 16000, "WAV", "PCM_16"), "silent"),
        (_encode(np.full(800, np.nan, np.float32), 16000, "WAV", "FLOAT"), "NaN"),
        (_encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"), "no samples"),
    ],
)
def test_bad_clips_raise_naming_the_file(data, reason):
    with pytest.raises(ValueError, match=f"bad_clip.wav.*{reason}"):
        decode_audio(data, "bad_clip.wav")


def test_flac_round_trip():
    wave = _sine(16000, 0.25, 500.0, 1)[:, 0]
    decoded, rate = decode_audio(encode_flac(wave), "roundtrip.flac")
    assert rate == SAMPLE_RATE
    np.testing.assert_allclose(decoded, wave, atol=1e-4)


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_a_clip_over_the_cap_is_refused_from_its_header(fmt, subtype):
    data = _encode(_sine(22050, 2.0, 440.0, 1), 22050, fmt, subtype)
    with pytest.raises(ValueError) as refused:
        decode_audio(data, "long.wav", max_seconds=1.5)
    assert str(refused.value) == (
        "long.wav: 2 s of audio, longer than data.max_audio_seconds=1.5; not decoded (split it into shorter clips, "
        "or raise the cap)"
    )
    wave, _ = decode_audio(data, "long.wav", max_seconds=2.5)
    assert abs(len(wave) - 2 * SAMPLE_RATE) <= 2
