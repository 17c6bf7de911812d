"""`selfsup shards write` from folders: bad input is one line naming the path and what to do (never a
traceback), bad files are skipped and named, `--test-fraction` splits each class with a fixed seed,
and `shards verify` names the source file of a bad sample."""

from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from selfsup.cli import main
from selfsup.data.reader import read_manifest, read_split
from selfsup.data.shards import SOURCE_FILES
from selfsup.data.sources import encode_png


def _image(path: Path, value: int = 0, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _png_with_bad_pixels() -> bytes:
    """A PNG whose chunks and CRCs are all valid but whose IDAT holds far fewer rows than its header
    says: PIL's ``verify()`` passes it, only decoding the pixels fails."""
    good = encode_png(np.full((16, 16), 128, np.uint8))
    out, pos = bytearray(good[:8]), 8
    while pos < len(good):
        (n,), kind = struct.unpack(">I", good[pos : pos + 4]), good[pos + 4 : pos + 8]
        data = zlib.compress(b"\x00" * 10) if kind == b"IDAT" else good[pos + 8 : pos + 8 + n]
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        pos += 12 + n
    return bytes(out)


def _wav(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, int(16000 * seconds)).astype(np.float32)
    sf.write(path, wave, 16000, subtype="PCM_16")
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("selfsup: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    "case",
    [
        "flat",
        "no-images",
        "missing-images",
        "missing-audio",
        "out-under-a-file",
        "out-is-a-file",
        "labels-missing",
        "labels-without-path",
        "bad-fraction",
    ],
)
def test_bad_input_is_one_line_naming_the_path_and_what_to_do(tmp_path, case, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _image(src / "cat" / "a.png")
    _wav(tmp_path / "speech" / "a.wav", 0.5)
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "no-path.csv").write_text("file,label\na.wav,yes\n")
    (tmp_path / "docs" / "notes").mkdir(parents=True)
    (tmp_path / "docs" / "notes" / "readme.txt").write_text("no images here")
    image_folder = ["shards", "write", "image-folder", str(src), str(out)]
    audio_folder = ["shards", "write", "audio-folder", str(tmp_path / "speech"), str(out)]
    argv, expected = {
        "flat": (
            ["shards", "write", "image-folder", str(src / "cat"), str(out)],
            f"{src / 'cat'} has no class sub-folders; lay it out as {src / 'cat'}/<class>/<image>",
        ),
        "no-images": (
            ["shards", "write", "image-folder", str(tmp_path / "docs"), str(out)],
            f"{tmp_path / 'docs'}: no images in its class folders (looked for .bmp,",
        ),
        "missing-images": (
            ["shards", "write", "image-folder", str(tmp_path / "nowhere"), str(out)],
            f"image folder {tmp_path / 'nowhere'} does not exist; check the path",
        ),
        "missing-audio": (
            ["shards", "write", "audio-folder", str(tmp_path / "nowhere"), str(out)],
            f"audio folder {tmp_path / 'nowhere'} does not exist; check the path",
        ),
        "out-under-a-file": (
            image_folder[:-1] + [str(tmp_path / "file" / "out")],
            f"{tmp_path / 'file' / 'out'}: cannot create the output folder",
        ),
        "out-is-a-file": (
            image_folder[:-1] + [str(tmp_path / "file")],
            f"{tmp_path / 'file'}: cannot create the output folder",
        ),
        "labels-missing": (
            audio_folder + ["--labels", str(tmp_path / "gone.csv")],
            f"{tmp_path / 'gone.csv'}: no such labels CSV; check --labels",
        ),
        "labels-without-path": (
            audio_folder + ["--labels", str(tmp_path / "no-path.csv")],
            f"{tmp_path / 'no-path.csv'}: needs a header with a 'path' column",
        ),
        "bad-fraction": (image_folder + ["--test-fraction", "1.5"], "--test-fraction 1.5: give a fraction between 0"),
    }[case]
    assert main(argv) == 2
    assert expected in _one_error_line(capsys)
    assert not (out / "manifest.json").exists()


def test_test_fraction_needs_an_image_folder_and_no_split(tmp_path):
    with pytest.raises(SystemExit, match="--test-fraction is for image-folder"):
        main(["shards", "write", "audio-folder", str(tmp_path), str(tmp_path / "o"), "--test-fraction", "0.1"])
    with pytest.raises(SystemExit, match="leave out --split"):
        main(
            [
                "shards",
                "write",
                "image-folder",
                str(tmp_path),
                str(tmp_path / "o"),
                "--test-fraction",
                "0.1",
                "--split",
                "val",
            ]
        )


def test_corrupt_and_truncated_images_are_skipped_at_write_and_named(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        _image(src / "cat" / f"ok{i}.png", 10 * i)
    bad_pixels = src / "dog" / "bad-pixels.png"
    bad_pixels.parent.mkdir()
    bad_pixels.write_bytes(_png_with_bad_pixels())
    Image.open(bad_pixels).verify()  # a header-and-CRC check would let it through
    truncated = _image(src / "dog" / "truncated.png", 7, size=64)
    truncated.write_bytes(truncated.read_bytes()[:60])
    _image(src / "dog" / "ok.png", 99)
    out = tmp_path / "out"
    assert main(["shards", "write", "image-folder", str(src), str(out), "--processes", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 samples (0 converted, 2 unreadable skipped)" in printed
    assert f"  skipped: {bad_pixels}: not a readable image" in printed
    assert f"  skipped: {truncated}: not a readable image" in printed
    manifest, _ = read_manifest(str(out))
    assert manifest["num_samples"] == 4 and len(manifest["skipped"]) == 2


def test_a_truncated_wav_is_skipped_at_write_and_named(tmp_path, capsys):
    src = tmp_path / "speech"
    _wav(src / "good.wav", 0.5)
    short = _wav(src / "a" / "cut.wav", 1.0)
    short.write_bytes(short.read_bytes()[:100])  # the header and 28 samples
    out = tmp_path / "out"
    assert main(["shards", "write", "audio-folder", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 clips (1 bad skipped)" in printed
    assert "  skipped: a/cut.wav: 1.8 ms of audio, shorter than 25 ms (a truncated file?)" in printed
    assert read_manifest(str(out))[0]["shards"][0]["durations"] == [0.5]


def _split_folder(root: Path) -> dict[str, int]:
    sizes = {"ant": 10, "bee": 7, "cow": 3, "dog": 1}
    for c, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            _image(root / name / f"{i:02d}.png", 20 * c + i)
    return sizes


def test_test_fraction_splits_each_class_with_a_fixed_seed(tmp_path):
    src = tmp_path / "src"
    _split_folder(src)
    tests = []
    for run in ("one", "two"):
        out = tmp_path / run
        assert main(["shards", "write", "image-folder", str(src), str(out), "--test-fraction", "0.25"]) == 0
        train, _ = read_manifest(str(out / "train"))
        test, _ = read_manifest(str(out / "test"))
        assert (train["split"], test["split"]) == ("train", "test")
        assert train["classes"] == test["classes"] == ["ant", "bee", "cow", "dog"]
        labels = {
            split: Counter(read_split(str(out / split), lambda s: int(s["cls"]))[0]) for split in ("train", "test")
        }
        # of 10, 7, 3 and 1 images: round(2.5) = 3, round(1.75) = 2, round(0.75) = 1, and a lone image stays in train
        assert labels["test"] == {0: 3, 1: 2, 2: 1}
        assert labels["train"] == {0: 7, 1: 5, 2: 2, 3: 1}
        files = {
            split: set(json.loads((out / split / SOURCE_FILES).read_text()).values()) for split in ("train", "test")
        }
        assert not files["train"] & files["test"]
        assert files["train"] | files["test"] == {str(p) for p in src.rglob("*.png")}
        tests.append(files["test"])
    assert tests[0] == tests[1]  # the same files every time


def test_verify_names_the_source_file_of_a_bad_sample(tmp_path, capsys):
    src = tmp_path / "src"
    files = [_image(src / "cat" / f"{i}.png", 30 * i) for i in range(3)]
    out = tmp_path / "out"
    assert main(["shards", "write", "image-folder", str(src), str(out)]) == 0
    shard = out / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    second_png = data.find(b"\x89PNG", data.find(b"\x89PNG") + 1)
    data[second_png : second_png + 4] = b"JUNK"
    shard.write_bytes(bytes(data))
    assert main(["shards", "verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert (
        f"problem: {shard}: sample img-00000001: unreadable image header (UnidentifiedImageError: cannot "
        "identify image file)"
    ) in printed
    assert f"(written from {files[1]})" in printed
