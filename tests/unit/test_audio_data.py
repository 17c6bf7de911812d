"""Audio data: audio-folder ingestion (formats, rates, bad files, CSV splits) and the audio collate."""

from __future__ import annotations

import csv
import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from selfsup.cli import main as selfsup
from selfsup.pipelines.loader import DataHealth, ShardStream, collate_audio, decode_audio_sample
from selfsup.pipelines.shards import decode_sample, iter_shard, read_manifest, write_shards
from selfsup.pipelines.sources import audio_folder_samples

# name -> (format, subtype, rate, channels, seconds): every good file of the folder
GOOD = {
    "a/one.wav": ("WAV", "PCM_16", 16000, 1, 0.5),
    "a/b/two.flac": ("FLAC", "PCM_16", 22050, 2, 0.4),
    "three.ogg": ("OGG", "VORBIS", 44100, 1, 0.3),
    "c/four.mp3": ("MP3", "MPEG_LAYER_III", 8000, 1, 0.6),
}
BAD = ["silent.wav", "nan.wav", "broken.wav"]


def _sine(rate: int, seconds: float, channels: int) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * 330 * t)] * channels, axis=1).astype(np.float32)


@pytest.fixture
def audio_folder(tmp_path) -> Path:
    root = tmp_path / "audio"
    for name, (fmt, subtype, rate, channels, seconds) in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, _sine(rate, seconds, channels), rate, format=fmt, subtype=subtype)
    sf.write(root / "silent.wav", np.zeros(8000, np.float32), 16000, subtype="PCM_16")
    nan = _sine(16000, 0.2, 1)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (root / "notes.txt").write_text("not audio, ignored")
    return root


def test_folder_without_labels_writes_good_clips_and_lists_bad_ones(audio_folder, tmp_path):
    samples, n, classes = audio_folder_samples(audio_folder, processes=1)
    assert n == len(GOOD) + len(BAD) and classes == []
    m = write_shards(samples, tmp_path / "out", kind="audio", total=n)
    assert m["num_samples"] == len(GOOD) and m["format"] == "audio"
    assert sorted(s.split(":")[0] for s in m["skipped"]) == sorted(BAD)
    _, urls = read_manifest(str(tmp_path / "out"))
    seen = {}
    for sample in iter_shard(urls[0]):
        (wave, rate), info = decode_sample(sample, "audio")
        assert rate == 16000 and wave.ndim == 1  # stored 16 kHz mono
        seen[info["path"]] = info
        assert abs(info["duration"] - len(wave) / 16000) < 1e-6
    assert set(seen) == set(GOOD)
    for name, (_, _, rate, _, seconds) in GOOD.items():
        assert seen[name]["original_rate"] == rate
        assert abs(seen[name]["duration"] - seconds) < 0.08  # MP3 adds encoder padding


def test_cli_with_labels_csv_writes_one_folder_per_split(audio_folder, tmp_path):
    rows = [("a/one.wav", "yes", "train", "ann"), ("a/b/two.flac", "no", "train", "bob"),
            ("three.ogg", "yes", "test", "cy"), ("c/four.mp3", "no", "test", "cy"),
            ("silent.wav", "no", "train", "ann"), ("nan.wav", "yes", "train", "bob"),
            ("broken.wav", "yes", "test", "cy"), ("missing/gone.wav", "no", "train", "ann")]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split", "speaker"), *rows])
    out = tmp_path / "shards"
    assert selfsup(["shards", "write", "audio-folder", str(audio_folder), str(out), "--labels", str(labels)]) == 0

    train, _ = read_manifest(str(out / "train"))
    test, _ = read_manifest(str(out / "test"))
    assert (train["num_samples"], len(train["skipped"])) == (2, 3)
    assert (test["num_samples"], len(test["skipped"])) == (2, 1)
    assert train["classes"] == test["classes"] == ["no", "yes"]
    assert any("missing/gone.wav" in s for s in train["skipped"])
    assert any(s.startswith("broken.wav") for s in test["skipped"])
    infos = {}
    for split in ("train", "test"):
        for sample in iter_shard(str(out / split / f"{split}-000000.tar")):
            info = json.loads(sample["json"])
            infos[info["path"]] = info
    assert infos["a/one.wav"]["label"] == 1 and infos["a/b/two.flac"]["label"] == 0
    assert infos["three.ogg"]["speaker"] == "cy" and infos["three.ogg"]["split"] == "test"


def test_collate_crops_every_clip_to_the_shortest_capped_at_max():
    items = [(torch.arange(n, dtype=torch.float32), label) for label, n in enumerate([20000, 12000, 40000])]
    batch = collate_audio(items, max_samples=16000, min_samples=4000, rng=random.Random(0))
    assert batch["waves"].shape == (3, 12000)
    assert batch["lengths"].tolist() == [12000] * 3 and batch["labels"].tolist() == [0, 1, 2]
    for crop, (wave, _) in zip(batch["waves"], items):  # contiguous windows of the source clips
        start = int(crop[0])
        torch.testing.assert_close(crop, wave[start:start + 12000])
    long = [(torch.zeros(n), 0) for n in (50000, 30000)]
    assert collate_audio(long, max_samples=16000, min_samples=4000)["waves"].shape == (2, 16000)
    with pytest.raises(ValueError, match="4000"):
        collate_audio([(torch.zeros(3000), 0)], max_samples=16000, min_samples=4000)


def test_short_clips_are_skipped_and_counted_by_the_stream(audio_folder, tmp_path):
    samples, n, _ = audio_folder_samples(audio_folder, processes=1)
    write_shards(samples, tmp_path / "out", kind="audio", total=n)
    min_samples = 6000  # three.ogg (0.3 s = 4800 samples) is too short
    with pytest.raises(ValueError, match="shorter than the minimum 6000"):
        sample = next(s for s in iter_shard(str(tmp_path / "out" / "train-000000.tar"))
                      if json.loads(s["json"])["path"] == "three.ogg")
        decode_audio_sample(sample, min_samples)
    stream = ShardStream(str(tmp_path / "out"), 2, functools.partial(decode_audio_sample, min_samples=min_samples),
                         functools.partial(collate_audio, max_samples=16000, min_samples=min_samples), shuffle=False)
    health = DataHealth()
    batches = list(stream)
    for b in batches:
        health.add(b)
    # 4 good clips -> 2 batches; three.ogg is skipped and the last batch topped up with a repeat
    assert len(batches) == stream.steps_per_epoch() == 2
    assert [b["waves"].shape for b in batches] == [(2, 6400), (2, 6400)]  # cut to two.flac's 0.4 s
    assert (health.skipped, health.repeated) == (1, 1) and "shorter than the minimum" in health.where[0]
