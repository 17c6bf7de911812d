"""Audio data: audio-folder ingestion (formats, rates, bad files, CSV splits), the audio collate, and
batches planned by clip length from the manifest (fairseq's max_tokens)."""

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

from selfsup.audio.decode import encode_flac
from selfsup.cli import main as selfsup
from selfsup.config import parse_config
from selfsup.data.buckets import TokenBatching, bucket_batches, manifest_lengths, plan_token_epoch
from selfsup.data.decode import collate_audio, decode_audio_sample, decode_sample
from selfsup.data.reader import read_manifest, read_shard
from selfsup.data.shards import write_shards
from selfsup.data.sources import audio_folder_samples
from selfsup.data.stream import DataHealth, ShardStream, make_loader
from selfsup.tasks.audio import clip_limits

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
    seen, problems = {}, []
    for sample in read_shard(urls[0], problems, m["shards"][0]["count"], sha256=m["shards"][0]["sha256"]):
        (wave, rate), info = decode_sample(sample, "audio")
        assert rate == 16000 and wave.ndim == 1  # stored 16 kHz mono
        seen[info["path"]] = info
        assert abs(info["duration"] - len(wave) / 16000) < 1e-6
    assert set(seen) == set(GOOD) and problems == []
    for name, (_, _, rate, _, seconds) in GOOD.items():
        assert seen[name]["original_rate"] == rate
        assert abs(seen[name]["duration"] - seconds) < 0.08  # MP3 adds encoder padding


def test_cli_with_labels_csv_writes_one_folder_per_split(audio_folder, tmp_path):
    rows = [
        ("a/one.wav", "yes", "train", "ann"),
        ("a/b/two.flac", "no", "train", "bob"),
        ("three.ogg", "yes", "test", "cy"),
        ("c/four.mp3", "no", "test", "cy"),
        ("silent.wav", "no", "train", "ann"),
        ("nan.wav", "yes", "train", "bob"),
        ("broken.wav", "yes", "test", "cy"),
        ("missing/gone.wav", "no", "train", "ann"),
    ]
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
        for sample in read_shard(str(out / split / f"{split}-000000.tar"), []):
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
        torch.testing.assert_close(crop, wave[start : start + 12000])
    long = [(torch.zeros(n), 0) for n in (50000, 30000)]
    assert collate_audio(long, max_samples=16000, min_samples=4000)["waves"].shape == (2, 16000)
    with pytest.raises(ValueError, match="4000"):
        collate_audio([(torch.zeros(3000), 0)], max_samples=16000, min_samples=4000)


def test_short_clips_are_skipped_and_counted_by_the_stream(audio_folder, tmp_path):
    samples, n, _ = audio_folder_samples(audio_folder, processes=1)
    write_shards(samples, tmp_path / "out", kind="audio", total=n)
    min_samples = 6000  # three.ogg (0.3 s = 4800 samples) is too short
    with pytest.raises(ValueError, match="shorter than the minimum 6000"):
        sample = next(
            s
            for s in read_shard(str(tmp_path / "out" / "train-000000.tar"), [])
            if json.loads(s["json"])["path"] == "three.ogg"
        )
        decode_audio_sample(sample, min_samples)
    stream = ShardStream(
        str(tmp_path / "out"),
        2,
        functools.partial(decode_audio_sample, min_samples=min_samples),
        functools.partial(collate_audio, max_samples=16000, min_samples=min_samples),
        shuffle=False,
    )
    health = DataHealth()
    batches = list(stream)
    for b in batches:
        health.add(b)
    # 4 good clips -> 2 batches; three.ogg is skipped and the last batch topped up with a repeat
    assert len(batches) == stream.steps_per_epoch() == 2
    assert [b["waves"].shape for b in batches] == [(2, 6400), (2, 6400)]  # cut to two.flac's 0.4 s
    assert (health.skipped, health.repeated) == (1, 1) and "shorter than the minimum" in health.where[0]


def test_clips_over_max_audio_seconds_are_skipped_and_counted_by_the_training_stream(audio_folder, tmp_path):
    samples, n, _ = audio_folder_samples(audio_folder, processes=1)
    write_shards(samples, tmp_path / "out", kind="audio", total=n)
    cfg = parse_config(
        {
            "name": "capped",
            "data": {"kind": "audio", "train": str(tmp_path / "out"), "batch_size": 1, "min_seconds": 0.1},
            "method": {"name": "wav2vec2", "preset": "tiny"},
        },
        ["data.max_audio_seconds=0.45"],
    )
    from selfsup.tasks.audio import AudioTask

    health = DataHealth()
    for batch in AudioTask().train_stream(cfg):
        health.add(batch)
    # one.wav (0.5 s) and four.mp3 (0.6 s) are over 0.45 s; two.flac and three.ogg are trained
    assert health.skipped == 2, health.where
    assert all("longer than data.max_audio_seconds=0.45; not decoded" in w for w in health.where), health.where


def test_the_manifest_records_each_clip_duration(audio_folder, tmp_path):
    samples, n, _ = audio_folder_samples(audio_folder, processes=1)
    m = write_shards(samples, tmp_path / "out", kind="audio", total=n)
    [shard] = m["shards"]
    waves = [decode_sample(s, "audio")[0][0] for s in read_shard(str(tmp_path / "out" / shard["name"]), [])]
    assert len(shard["durations"]) == shard["count"] == len(waves) == len(GOOD)
    assert manifest_lengths(m, 16000) == [[len(w) for w in waves]]  # exact sample counts back
    assert (
        "durations" not in write_shards(iter([{"__key__": "k", "png": b"x", "cls": 0}]), tmp_path / "img")["shards"][0]
    )


SPEC = TokenBatching(max_tokens=24000, min_length=2000, max_length=8000, bucket_size=16, rate=16000)


def test_a_bucket_is_cut_longest_first_into_batches_filled_to_max_tokens_at_their_crop():
    lengths = [9000, 3000, 1500, 6100, 8000, 2900, 6000, 5000, 12000, 2000, 4000, 4000]
    batches = bucket_batches(lengths, 0, 0, (0, 12), SPEC, random.Random(0))
    # capped at 8000 and sorted: 8000 x3 (0, 4, 8), 6100 (3), 6000 (6), 5000 (7), 4000 x2 (10, 11), 3000 (1),
    # 2900 (5), 2000 (9); 1500 (2) is under min_length. From 8000: 1, 2, 3 clips fill 8000, 16000, 24000,
    # a 4th overflows (4 x 6100). From 6100: 6100, 12000, 15000, 16000, 20000 at 5 clips (crop 4000), then
    # 6 x 3000 = 18000 < 20000, 7 x 2900 = 20300, 8 x 2000 = 16000: 7 clips, the fullest. Left: 2000.
    assert [b.positions for b in batches] == [(0, 4, 8), (1, 3, 5, 6, 7, 10, 11), (9,)]
    assert [len(b.positions) * min(min(lengths[i], 8000) for i in b.positions) for b in batches] == [24000, 20300, 2000]
    spec = TokenBatching(max_tokens=7000, min_length=2000, max_length=8000, bucket_size=16, rate=16000)
    assert spec.cap == 7000  # a clip longer than max_tokens is cropped to it: one clip still fits
    assert [b.positions for b in bucket_batches(lengths, 0, 0, (0, 4), spec, random.Random(0))] == [(0,), (3,), (1,)]


def _clip_lengths(n: int = 96, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(1000, 12000, n)]


def test_the_token_plan_gives_equal_steps_each_clip_at_most_once_and_the_same_count_every_epoch():
    lengths = [_clip_lengths(40, s) for s in range(5)]  # 5 shards, 3 buckets each
    plans = [plan_token_epoch(lengths, ranks=3, workers=2, spec=SPEC, seed=1, epoch=e) for e in range(3)]
    assert len({p.steps for p in plans}) == 1 and len({len(p.flat) for p in plans}) == 1
    assert plans[0].order != plans[1].order and plans[0].flat != plans[1].flat
    assert plans[0] == plan_token_epoch(lengths, 3, 2, SPEC, seed=1, epoch=0)  # every rank plans the same
    p = plans[0]
    assert [sum(q) for q in p.quotas] == [p.steps] * 3 and p.steps == len(p.flat) // 3
    used = [(b.shard, i) for row in p.batches for w in row for b in w for i in b.positions]
    assert len(used) == len(set(used))
    usable = {(s, i) for s, ls in enumerate(lengths) for i, n in enumerate(ls) if n >= SPEC.min_length}
    left = {(b.shard, i) for b in p.flat[3 * p.steps :] for i in b.positions}  # fewer than `ranks` batches
    assert set(used) == usable - left and len(p.flat) - 3 * p.steps < 3
    for b in p.flat:
        clip = [min(lengths[b.shard][i], SPEC.cap) for i in b.positions]
        assert len(b.positions) * min(clip) <= SPEC.max_tokens  # the batch tensor, B x crop


def write_clip_shards(out: Path, lengths: list[int], per_shard: int) -> Path:
    """Audio shards of noise clips of ``lengths`` samples at 16 kHz; each clip's label is its index."""
    rng = np.random.default_rng(0)
    samples = (
        {
            "__key__": f"clip{i:05d}",
            "flac": encode_flac((0.1 * rng.standard_normal(n)).astype(np.float32)),
            "json": {"duration": n / 16000, "original_rate": 16000, "label": i},
        }
        for i, n in enumerate(lengths)
    )
    write_shards(samples, out, kind="audio", samples_per_shard=per_shard)
    return out


def token_stream(location, rank=0, ranks=1, workers=1, spec=SPEC, **kw) -> ShardStream:
    return ShardStream(
        str(location),
        4,
        functools.partial(decode_audio_sample, min_samples=spec.min_length),
        functools.partial(collate_audio, max_samples=spec.cap, min_samples=spec.min_length),
        rank=rank,
        ranks=ranks,
        workers=workers,
        seed=5,
        tokens=spec,
        **kw,
    )


def token_epoch(location, ranks, workers, epoch=0, start_step=0) -> list[list[tuple[list[int], tuple, int]]]:
    """Per rank: [(clip labels, waves shape, repeated)] of each batch, read through DataLoaders."""
    out = []
    for r in range(ranks):
        stream = token_stream(location, r, ranks, workers)
        stream.set_epoch(epoch, start_step)
        out.append(
            [
                (b["labels"].tolist(), tuple(b["waves"].shape), int(b["repeated"]))
                for b in make_loader(stream, workers if workers > 1 else 0)
            ]
        )
        assert len(out[-1]) == stream.steps_per_epoch() - start_step
    return out


@pytest.fixture
def clip_shards(tmp_path) -> tuple[Path, list[int]]:
    lengths = _clip_lengths()
    return write_clip_shards(tmp_path / "clips", lengths, per_shard=32), lengths


def test_max_tokens_batches_through_dataloaders_over_2_ranks_x_2_workers(clip_shards):
    location, lengths = clip_shards
    got = token_epoch(location, ranks=2, workers=2)
    assert len(got[0]) == len(got[1]) > 0  # the same steps on every rank
    labels = [i for rank in got for ids, _, _ in rank for i in ids]
    assert len(labels) == len(set(labels)) and all(lengths[i] >= SPEC.min_length for i in labels)
    shapes = [shape for rank in got for _, shape, _ in rank]
    assert all(b * s <= SPEC.max_tokens and SPEC.min_length <= s <= SPEC.cap for b, s in shapes)
    assert len({b for b, _ in shapes}) > 1  # batches of varying size
    for ids, (_, s), _ in got[0]:  # cropped to the batch's shortest clip, capped
        assert s == min(min(lengths[i] for i in ids), SPEC.cap)
    again = token_epoch(location, ranks=2, workers=2, epoch=1)
    assert [len(r) for r in again] == [len(r) for r in got] and again != got


def test_a_resumed_max_tokens_epoch_yields_exactly_the_remaining_batches(clip_shards):
    location, _ = clip_shards
    [full] = token_epoch(location, ranks=1, workers=2)
    [rest] = token_epoch(location, ranks=1, workers=2, start_step=3)
    assert [ids for ids, _, _ in rest] == [ids for ids, _, _ in full[3:]]


def test_max_tokens_batches_lost_to_a_truncated_shard_are_made_up_and_counted(clip_shards):
    location, lengths = clip_shards
    shard = location / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    stream = token_stream(location)
    health, batches = DataHealth(), []
    for b in stream:
        batches.append((b["labels"].tolist(), int(b["repeated"])))
        health.add(b)
    assert len(batches) == stream.steps_per_epoch()  # the planned steps, whatever was lost
    planned = {i for i, n in enumerate(lengths) if n >= SPEC.min_length}
    seen = {i for ids, rep in batches if not rep for i in ids}
    assert health.skipped == len(planned - seen) > 0 and all(32 <= i < 64 for i in planned - seen)
    assert health.repeated == sum(len(ids) for ids, rep in batches if rep) > 0
    assert any(str(shard) in w and "samples lost" in w for w in health.where)


def test_max_tokens_batches_check_the_checksum_of_shards_read_whole(clip_shards):
    location, _ = clip_shards
    shard = location / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # in the tar's end padding: every clip still reads
    shard.write_bytes(bytes(data))
    for verify, mismatched in ((False, 0), (True, 1)):
        health = DataHealth()
        for b in token_stream(location, verify_checksums=verify):  # one rank, one worker: every shard whole
            health.add(b)
        assert (health.skipped, health.repeated, health.mismatched) == (0, 0, mismatched)
    assert health.where == [
        f"{shard}: sha256 differs from the manifest (shard changed or corrupt); run `selfsup shards verify {location}`"
    ]


def test_an_old_manifest_without_durations_falls_back_to_fixed_batches_with_a_warning(clip_shards, caplog):
    location, lengths = clip_shards
    manifest = json.loads((location / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["durations"]
    (location / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="selfsup.data"):
        stream = token_stream(location)
    [line] = [r.getMessage() for r in caplog.records]
    assert "records no clip durations" in line and "data.batch_size" in line and "\n" not in line
    assert stream.tokens is None and stream.steps_per_epoch() == len(lengths) // 4


def test_a_clip_the_manifest_marks_unreadable_is_left_out_with_its_cause(clip_shards, caplog):
    location, lengths = clip_shards
    manifest = json.loads((location / "manifest.json").read_text())
    usable = next(i for i, n in enumerate(lengths) if n >= SPEC.min_length)
    manifest["shards"][0]["durations"][usable] = None  # as `shards index` records a clip it cannot read
    (location / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="selfsup.data"):
        stream = token_stream(location)
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (
        f"{location}: 1 clips are unreadable by the manifest (null duration) and left out; "
        f"`selfsup shards verify {location}` names them"
    )
    assert stream.tokens is not None  # still planned by length: not taken for an old manifest
    [got] = token_epoch(location, ranks=1, workers=1)
    labels = {i for ids, _, rep in got if not rep for i in ids}
    assert usable not in labels and labels == {i for i, n in enumerate(lengths) if n >= SPEC.min_length} - {usable}


def test_max_tokens_below_the_shortest_usable_clip_is_refused_naming_both():
    tree = {
        "name": "t",
        "data": {"kind": "audio", "train": "x", "min_seconds": 0.5, "max_seconds": 2.0},
        "method": {"name": "wav2vec2", "preset": "tiny"},
    }
    assert clip_limits(parse_config(tree, ["data.max_tokens=8000"])) == (8000, 32000)
    with pytest.raises(ValueError, match=r"data.max_tokens 7999 is below the shortest usable clip, 8000 samples"):
        clip_limits(parse_config(tree, ["data.max_tokens=7999"]))
