"""The audio demo's data builders: spoken digits from espeak-ng (exact counts, disjoint train/test voices,
labels) and the one-line errors for a missing tool. The speech corpus needs the network (apt-get
download), so it is not built here."""

from __future__ import annotations

import csv
import shutil
import wave

import pytest

from selfsup.cli import main
from selfsup.data import builders

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _rows(folder) -> list[dict]:
    with open(folder / builders.DIGITS_CSV, newline="") as f:
        return list(csv.DictReader(f))


@needs_espeak
def test_spoken_digits_counts_labels_and_disjoint_voices(tmp_path):
    out = tmp_path / "digits"
    assert builders.build_spoken_digits(out, per_class=6) == 60
    rows = _rows(out)
    assert list(rows[0]) == ["path", "label", "split", "voice", "speed", "pitch"]
    assert sorted(int(r["label"]) for r in rows) == sorted(list(range(10)) * 6)
    splits = {s: [r for r in rows if r["split"] == s] for s in ("train", "test")}
    assert [len(splits["train"]), len(splits["test"])] == [40, 20]  # clips 0 and 5 of each digit are test
    variants = {s: {r["voice"].split("+", 1)[1] for r in part} for s, part in splits.items()}
    assert not variants["train"] & variants["test"]
    held_out = set(builders.espeak_variants(shutil.which("espeak-ng"))[::4])
    assert variants["test"] <= held_out and not variants["train"] & held_out
    assert all(r["voice"].split("+", 1)[0] in builders.DIGIT_ACCENTS for r in rows)
    assert all(120 <= int(r["speed"]) <= 220 and 20 <= int(r["pitch"]) <= 80 for r in rows)
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(r["path"].split("/")[1] for r in rows)
    with wave.open(str(out / rows[0]["path"])) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2) and 0.2 < w.getnframes() / w.getframerate() < 2.0


def test_digit_jobs_are_fixed_by_the_seed():
    variants = [f"v{i:02d}" for i in range(12)]
    first = builders.digit_jobs(3, variants, seed=0)
    assert first == builders.digit_jobs(3, variants, seed=0)
    assert first != builders.digit_jobs(3, variants, seed=1)
    assert {j["word"] for j in first if j["label"] == 7} == {"seven"}


def test_missing_espeak_is_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run on it
    with pytest.raises(builders.MissingTool, match=r"^espeak-ng is not installed: sudo apt-get install espeak-ng$"):
        builders.build_spoken_digits(tmp_path / "digits", per_class=2)
    assert main(["demo", "--audio", "--data", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err == "selfsup: error: espeak-ng is not installed: sudo apt-get install espeak-ng\n"


def test_missing_apt_get_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(builders.shutil, "which", lambda program: None)
    with pytest.raises(
        builders.MissingTool,
        match=r"^apt-get is not installed: the speech corpus is unpacked from "
        r"the Debian packages flight-of-the-amazon-queen .* \(Debian or Ubuntu\)$",
    ):
        builders.build_speech_corpus(tmp_path / "speech")
    assert not (tmp_path / "speech").exists()


def test_failed_synthesis_is_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "espeak-ng"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'unknown voice' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(builders, "espeak_variants", lambda espeak: ["a", "b"])
    with pytest.raises(builders.BuildError, match=r"^espeak-ng -v \S+ 'zero' failed: unknown voice$"):
        builders.build_spoken_digits(tmp_path / "digits", per_class=1)
    assert not (tmp_path / "digits" / builders.DIGITS_CSV).exists()


@needs_espeak
def test_shards_build_command_writes_the_set_and_says_the_next_step(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["shards", "build", "spoken-digits", str(out), "--per-class", "1"]) == 0
    assert [r["split"] for r in _rows(out)] == ["test"] * 10  # clip 0 of each digit is a test clip
    assert (
        f"10 clips in {out}; as shards: selfsup shards write audio-folder {out} {out}-shards" in capsys.readouterr().out
    )
