"""Bad data that used to pass unnamed: an image over data.max_image_pixels (a decompression bomb), a key
repeated later in its tar, a member with no extension, one bad image among good ones, and member names
no locale can print. Each is skipped, counted with its true cause, and named safely."""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFile

from selfsup.cli import main
from selfsup.config import parse_config
from selfsup.data.decode import decode_sample
from selfsup.data.reader import UNKNOWN, read_manifest, read_shard
from selfsup.data.shards import index_shards, verify_shards, write_shards
from selfsup.data.sources import encode_png
from selfsup.data.stream import DataHealth, ShardStream
from selfsup.tasks.vision import image_decoding

ROOT = Path(__file__).resolve().parents[2]


def _bomb(side: int = 10_000) -> bytes:
    """A 1-bit PNG of ``side`` x ``side`` black pixels: 100 MP in a few kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z = b"\x00" * (1 + side // 8), zlib.compressobj(9)
    pixels = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _png(value: int) -> bytes:
    return encode_png(np.full((28, 28), value, np.uint8))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (name, bytes) members in this order (names may hold surrogate-escaped raw bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _image_members(key: str, png: bytes, label: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png), (f"{key}.cls", str(label).encode())]


def _health(location: str, cfg_overrides: dict | None = None) -> tuple[DataHealth, int]:
    """Read one epoch of ``location`` as training does (batches of 1, one worker): (health, batches)."""
    cfg = parse_config(
        {"name": "c", "data": {"train": location, **(cfg_overrides or {})}, "method": {"name": "simclr"}}
    )
    decode, collate = image_decoding(cfg, read_manifest(location)[0])
    stream = ShardStream(location, 1, decode, collate, shuffle=False)
    health, batches = DataHealth(), 0
    for batch in stream:
        health.add(batch)
        batches += 1
    return health, batches


def test_an_image_over_the_pixel_cap_is_refused_from_its_header_with_its_cause(tmp_path, monkeypatch):
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real(self))
    sample = {"__key__": "bomb", "png": _bomb(), "cls": b"1"}
    with pytest.raises(ValueError) as caught:
        decode_sample(sample, "image")
    assert str(caught.value) == (
        "sample bomb: 10000x10000 px (100.0 MP) is over data.max_image_pixels=64000000, "
        "not decoded (downscale it, or raise the cap)"
    )
    assert loads == []  # nothing was decoded
    decode_sample({"__key__": "ok", "png": _png(9), "cls": b"1"}, "image")
    assert loads == [(28, 28)]

    # in training, under the config's own cap: skipped, counted, named; the manifest keeps its size null
    out = tmp_path / "shards"
    samples = [{"__key__": f"s{i}", "png": _bomb() if i == 2 else _png(i), "cls": 0} for i in range(5)]
    manifest = write_shards(iter(samples), out)
    assert manifest["shards"][0]["sizes"] == [[28, 28], [28, 28], None, [28, 28], [28, 28]]
    health, batches = _health(str(out))
    assert (health.skipped, health.repeated, batches) == (1, 1, 5)  # the 5-step plan is topped up once
    assert health.where == [
        f"{out}/train-000000.tar: sample s2: 10000x10000 px (100.0 MP) is over "
        "data.max_image_pixels=64000000, not decoded (downscale it, or raise the cap)"
    ]
    cfg = parse_config(
        {"name": "c", "data": {"train": str(out), "max_image_pixels": 783}, "method": {"name": "simclr"}}
    )
    with pytest.raises(ValueError, match=r"sample s0: 28x28 px \(0.0 MP\) is over data.max_image_pixels=783"):
        image_decoding(cfg, manifest)[0](samples[0])


def test_one_bad_image_is_named_not_blamed_on_an_older_selfsup(tmp_path, caplog):
    out = tmp_path / "shards"
    samples = [{"__key__": f"s{i}", "png": b"not a png" if i == 1 else _png(i), "cls": 0} for i in range(4)]
    write_shards(iter(samples), out)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        health, batches = _health(str(out))
    assert not [r for r in caplog.records if "older selfsup" in r.getMessage()]
    assert health.skipped == 1 and batches == 4
    assert health.where == [
        f"{out}/train-000000.tar: sample s1: unreadable image header (UnidentifiedImageError: "
        "cannot identify image file)"
    ]


def test_a_key_repeated_later_in_its_tar_is_read_once_and_counted(tmp_path, capsys):
    root = tmp_path / "wds"
    members = [
        *_image_members("a", _png(1)),
        *_image_members("b", _png(2)),
        *_image_members("a", _png(3)),
        *_image_members("c", _png(4)),
    ]
    tar = _tar(root / "part-0.tar", members)
    assert main(["shards", "index", str(root)]) == 0
    assert (
        f"unreadable, the reader will skip it: {tar}: sample a: its key repeats sample 0 of this tar (read once)"
    ) in capsys.readouterr().out
    manifest, _ = read_manifest(str(root))
    assert manifest["shards"][0]["count"] == 4 and manifest["shards"][0]["sizes"][2] is None

    # a reader whose range starts after the first copy still knows it: the tar is read from its start
    later = list(read_shard(str(tar), [], 4, start=2, stop=4))
    assert [s["__key__"] for s in later] == ["a", "c"] and "png" not in later[0]

    health, batches = _health(str(root))
    assert (health.skipped, health.duplicates, batches) == (1, 1, 4)
    assert "sample a: its key repeats sample 0" in health.where[0]
    assert "1 bad samples skipped (1 of them repeated keys)" in health.summary()
    report = verify_shards(str(root))
    assert report.samples == 3 and len(report.problems) == 1


def test_a_member_with_no_extension_is_counted_not_dropped(tmp_path, capsys):
    root = tmp_path / "wds"
    tar = _tar(
        root / "part-0.tar", [*_image_members("a", _png(1)), ("README", b"hello"), *_image_members("b", _png(2))]
    )
    problems = []
    assert [s["__key__"] for s in read_shard(str(tar), problems, 2)] == ["a", "b"]
    assert [(p.kind, p.position, str(p)) for p in problems] == [
        (UNKNOWN, 0, f"{tar}: member 'README' has no extension, so it belongs to no sample; not read")
    ]
    assert list(read_shard(str(tar), problems := [], 2, start=1)) and problems == []  # another reader's range
    manifest, lines = index_shards(root)
    assert manifest["shards"][0]["count"] == 2 and lines == [
        f"{tar}: member 'README' has no extension, so it belongs to no sample; not read"
    ]
    health, batches = _health(str(root))
    assert (health.unknown, health.skipped, batches) == (1, 0, 2)
    assert "1 tar members of no sample (no extension) not read" in health.summary()
    assert not verify_shards(str(root)).ok


def test_member_names_no_locale_can_print_are_escaped(tmp_path):
    root = tmp_path / "wds"
    raw = "\udcff\udcfeimg"  # the bytes ff fe, not UTF-8, as tarfile reads them
    _tar(
        root / "part-0.tar",
        [
            *_image_members("good", _png(1)),
            (f"{raw}.png", b"junk"),
            (f"{raw}.cls", b"0"),
            (raw, b"no extension"),
            *_image_members("café", _png(2)),
        ],
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "ascii:strict"}
    both = (
        "import sys; from selfsup.cli import main; "  # one process: torch loads once
        "print('rc', main(['shards', 'index', sys.argv[1]]), main(['shards', 'verify', sys.argv[1]]))"
    )
    done = subprocess.run([sys.executable, "-c", both, str(root)], env=env, capture_output=True)
    out, err = done.stdout.decode("ascii"), done.stderr.decode("ascii")  # ascii: nothing else was written
    assert done.returncode == 0 and "Traceback" not in err and "UnicodeEncodeError" not in err, err
    assert out.splitlines()[-1] == "rc 0 1"  # indexed; verify found problems, and named them
    assert out.count("sample \\udcff\\udcfeimg: unreadable image header") == 2  # index's line, verify's
    assert out.count("member '\\udcff\\udcfeimg' has no extension") == 2


def test_repeated_keys_and_unknown_members_reach_the_records_and_the_summary(tmp_path, capsys):
    import json

    from tests.helpers import tiny_config, write_config

    root = tmp_path / "wds"
    members = [m for i in range(15) for m in _image_members(f"s{i:02d}", _png(10 * i), i % 4)]
    members[4:4] = [("README", b"not a sample")]
    members += [*_image_members("s03", _png(200)), *_image_members("last", _png(1))]  # 17 positions: 2 steps of 8
    _tar(root / "part-0.tar", members)
    index_shards(root)
    config = write_config(tmp_path / "x.yaml", tiny_config("x", root, tmp_path / "runs", data={"shuffle_buffer": 0}))
    assert main(["pretrain", str(config), "--no-ray"]) == 0
    run = tmp_path / "runs" / "x"
    data = json.loads((run / "summary.json").read_text())["data"]
    assert {k: data[k] for k in DataHealth.COUNTS} == {
        "skipped": 1,
        "duplicates": 1,
        "unknown": 1,
        "repeated": 1,
        "mismatched": 0,
    }
    assert any("sample s03: its key repeats sample 3 of this tar" in w for w in data["where"])
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert (last["skipped_samples"], last["duplicate_samples"], last["unknown_members"]) == (1, 1, 1)


def test_shards_write_refuses_an_image_over_the_cap_from_its_header_naming_the_file(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    (src / "bomb.png").write_bytes(_bomb())
    for i in range(2):
        (src / f"ok{i}.png").write_bytes(_png(40 * i))
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real(self))
    assert (
        main(["shards", "write", "image-folder", str(tmp_path / "src"), str(tmp_path / "out"), "--processes", "1"]) == 0
    )
    assert (
        f"  skipped: {src / 'bomb.png'}: 10000x10000 px (100.0 MP), over the 64000000 pixels training "
        "decodes (data.max_image_pixels); pass --max-side to store it downscaled"
    ) in capsys.readouterr().out
    assert (10000, 10000) not in loads and read_manifest(str(tmp_path / "out"))[0]["num_samples"] == 2


def test_a_shard_with_a_wrong_sha256_that_still_decodes_is_counted_in_the_summary_and_warned_about(tmp_path, capsys):
    import json

    from tests.helpers import tiny_config, write_config, write_tiny_shards

    loc = write_tiny_shards(tmp_path / "s", [16])
    shard = loc / "train0-000000.tar"
    with tarfile.open(shard) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png") and m.size % 512)
    data = bytearray(shard.read_bytes())
    data[png.offset_data + png.size] ^= 0xFF  # a byte of the tar's padding after an image: every sample decodes
    shard.write_bytes(bytes(data))
    # 2 steps of 8 an epoch, the schedule in updates (3): the shard is read whole (and hashed) in the first
    # epoch only; the second stops after its first step
    tree = tiny_config("x", loc, tmp_path / "runs", data={"verify_checksums": True, "shuffle_buffer": 0})
    tree["optim"] = {"lr": 0.1, "updates": 3, "warmup_updates": 1}  # in place of tiny_config's epochs
    config = write_config(tmp_path / "x.yaml", tree)
    assert main(["pretrain", str(config), "--no-ray"]) == 0
    summary = json.loads((tmp_path / "runs" / "x" / "summary.json").read_text())
    assert (summary["steps"], summary["total_steps"]) == (3, 3)
    assert (summary["data"]["mismatched"], summary["data"]["skipped"], summary["data"]["repeated"]) == (1, 0, 0)
    assert summary["data"]["where"][0] == (
        f"{shard}: sha256 differs from the manifest (shard changed or corrupt); run `selfsup shards verify {loc}`"
    )
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: epoch")]
    assert len(warnings) == 2 and warnings[0].startswith(
        f"warning: epoch 1, so far: 1 shards with a wrong sha256 (run `selfsup shards verify`); first: {shard}: sha256"
    )
