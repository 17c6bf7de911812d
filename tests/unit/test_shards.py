import json

import numpy as np
import pytest
import torch

from selfsup.cli import main
from selfsup.data import sources
from selfsup.data.reader import ManifestError, read_manifest
from selfsup.data.shards import shards_info, verify_shards
from tests.helpers import make_images, write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_pair_to_shards_verify_and_info(tmp_path, gz, capsys):
    images, labels = make_images(23)
    img = write_idx(tmp_path / "imgs-idx3-ubyte", images, gz)
    lab = write_idx(tmp_path / "labs-idx1-ubyte", labels, gz)
    assert (
        main(
            [
                "shards",
                "write",
                "idx",
                str(img),
                str(lab),
                str(tmp_path / "out"),
                "--per-shard",
                "10",
                "--classes",
                "a,b,c,d",
            ]
        )
        == 0
    )
    manifest, urls = read_manifest(str(tmp_path / "out"))
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 3]
    assert len(urls) == 3 and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    report = verify_shards(str(tmp_path / "out"))
    assert report.ok and report.samples == 23
    assert shards_info(str(tmp_path / "out"))["classes"] == ["a", "b", "c", "d"]
    assert main(["shards", "info", str(tmp_path / "out")]) == 0
    assert '"num_samples": 23' in capsys.readouterr().out


def test_read_idx_round_trips_and_rejects_truncated_files(tmp_path):
    images, _ = make_images(5)
    path = write_idx(tmp_path / "x-idx3-ubyte", images)
    assert np.array_equal(sources.read_idx(path), images)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated"):
        sources.read_idx(path)
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        sources.read_idx(tmp_path / "junk")


def test_verify_reports_a_changed_shard(tmp_path, tiny_shards):
    shard = sorted(tiny_shards.glob("*.tar"))[2]
    shard.write_bytes(shard.read_bytes()[:1500])
    report = verify_shards(str(tiny_shards))
    assert not report.ok
    assert any("sha256" in p for p in report.problems)
    assert any(shard.name in p and "manifest says" in p for p in report.problems)
    assert main(["shards", "verify", str(tiny_shards)]) == 1


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    assert main(["shards", "write", "fashion-mnist", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err


def test_fashion_mnist_found_in_selfsup_data(tmp_path, monkeypatch):
    images, labels = make_images(12)
    for img, lab in sources.FASHION_MNIST_FILES.values():
        write_idx(tmp_path / img, images, gz=True)
        write_idx(tmp_path / lab, labels, gz=True)
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    assert main(["shards", "write", "fashion-mnist", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "test" / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and manifest["classes"][0] == "T-shirt/top"


def test_folder_without_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(str(tmp_path))


def test_image_folder_skips_unreadable_files(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / c / "a.jpg")
    (tmp_path / "imgs" / "dog" / "b.jpg").write_bytes(b"not a jpeg")
    assert main(["shards", "write", "image-folder", str(tmp_path / "imgs"), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["classes"] == ["cat", "dog"]
    assert len(manifest["skipped"]) == 1 and "b.jpg" in manifest["skipped"][0]


def break_header(shard, key: str) -> None:
    """Flip one byte of the tar header of ``key``'s first member (its name; the header checksum then
    fails), as a bit flip on disk would."""
    import tarfile

    with tarfile.open(shard) as tf:
        member = min((m for m in tf.getmembers() if m.name.startswith(key + ".")), key=lambda m: m.offset)
    data = bytearray(shard.read_bytes())
    data[member.offset] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def broken_1000(tmp_path_factory):
    """One 1,000-sample shard whose header of sample 500 has a flipped byte."""
    from tests.helpers import write_tiny_shards

    loc = write_tiny_shards(tmp_path_factory.mktemp("broken") / "s", [1000])
    break_header(loc / "train0-000000.tar", "s000500")
    return loc


def test_a_flipped_header_byte_mid_shard_is_reported_with_the_samples_lost(broken_1000, capsys):
    report = verify_shards(str(broken_1000))
    shard = f"{broken_1000}/train0-000000.tar"
    assert report.samples == 500  # samples 0..499 still read and decode
    assert report.problems == [
        f"{shard}: the tar ends after sample 500, the manifest says 1000 (a corrupt header or a truncated file); "
        "500 samples lost",
        f"{shard}: sha256 differs from the manifest (shard changed or corrupt)",
    ]
    assert main(["shards", "verify", str(broken_1000)]) == 1
    assert f"problem: {shard}: the tar ends after sample 500" in capsys.readouterr().out


def test_read_shard_counts_a_range_against_the_manifest(broken_1000):
    from selfsup.data.reader import read_shard

    url, problems = f"{broken_1000}/train0-000000.tar", []
    keys = [s["__key__"] for s in read_shard(url, problems, 1000, start=300, stop=700)]
    assert keys == [f"s{i:06d}" for i in range(300, 500)]
    assert [(p.position, p.lost) for p in problems] == [(500, 200)]  # 500..699 of the range asked for
    problems = []
    assert len(list(read_shard(url, problems, 1000, start=600, stop=800))) == 0
    assert [(p.position, p.lost) for p in problems] == [(500, 200)]
    problems = []
    assert len(list(read_shard(url, problems, 1000, stop=400))) == 400 and problems == []  # stops before the flip


def _key(sample):
    if sample["png"][:4] != b"\x89PNG":
        raise ValueError(f"sample {sample['__key__']}: not a PNG")
    return sample["__key__"]


@pytest.fixture
def split_with_problems(tmp_path):
    """Shards of 10, 10 and 4 samples: s000001 undecodable, shard 2's tar broken at its sample 2."""
    from tests.helpers import write_tiny_shards

    loc = write_tiny_shards(tmp_path / "s", [10, 10, 4])
    shard0 = loc / "train0-000000.tar"
    data = bytearray(shard0.read_bytes())
    second_png = data.find(b"\x89PNG", data.find(b"\x89PNG") + 1)
    data[second_png : second_png + 4] = b"JUNK"
    shard0.write_bytes(bytes(data))
    break_header(loc / "train2-000000.tar", "s000022")
    return loc


def test_read_split_reads_every_decodable_sample_and_names_each_problem(split_with_problems):
    from selfsup.data.reader import read_split

    items, manifest, problems = read_split(str(split_with_problems), _key)
    assert items == [f"s{i:06d}" for i in [0, *range(2, 10), *range(10, 20), 20, 21]]  # 24 - 1 - 2
    assert manifest["num_samples"] == 24
    assert problems == [
        f"{split_with_problems}/train0-000000.tar: sample s000001: not a PNG",
        f"{split_with_problems}/train2-000000.tar: the tar ends after sample 2, the manifest says 4 "
        "(a corrupt header or a truncated file); 2 samples lost",
    ]


def test_read_split_limit_takes_evenly_from_the_first_samples_of_every_shard(split_with_problems):
    from selfsup.data.reader import read_split

    # limit 7 over 3 shards: ceil(7 / 3) = 3 decodable items per shard, 7 in all
    items, _, problems = read_split(str(split_with_problems), _key, limit=7)
    assert items == ["s000000", "s000002", "s000003", "s000010", "s000011", "s000012", "s000020"]
    assert problems == [f"{split_with_problems}/train0-000000.tar: sample s000001: not a PNG"]  # shard 2's break unread


def test_read_split_of_nothing_decodable_says_so(split_with_problems):
    from selfsup.data.reader import read_split

    def refuse(sample):
        raise ValueError(f"sample {sample['__key__']}: refused")

    with pytest.raises(ValueError, match="split is empty.*selfsup shards verify"):
        read_split(str(split_with_problems), refuse)


def test_written_shards_carry_no_pax_headers(tiny_shards):
    import tarfile

    for shard in sorted(tiny_shards.glob("*.tar")):
        with tarfile.open(shard) as tf:
            members = tf.getmembers()
        assert members and all(m.pax_headers == {} for m in members), shard
        assert all(isinstance(m.mtime, int) for m in members)
        # no pax: each member is one 512-byte header and its data in 512-byte blocks
        assert members[1].offset - members[0].offset == 512 + -(-members[0].size // 512) * 512


def test_an_evaluation_split_is_decoded_once_with_its_problems(split_with_problems, monkeypatch):
    import os

    import selfsup.tasks.vision as vision
    from selfsup.config import parse_config

    cfg = parse_config({"name": "c", "data": {"train": str(split_with_problems)}, "method": {"name": "simclr"}})
    first = vision.VisionTask().read_labelled(str(split_with_problems), cfg)
    assert len(first.labels) == 21 and len(first.problems) == 2
    reads = []
    real = vision.read_split
    monkeypatch.setattr(vision, "read_split", lambda *a: reads.append(a) or real(*a))
    again = vision.VisionTask().read_labelled(str(split_with_problems), cfg)
    assert reads == []
    assert torch.equal(again.inputs, first.inputs) and (again.labels == first.labels).all()
    assert again.problems == first.problems and again.classes == first.classes
    vision.VisionTask().read_labelled(str(split_with_problems), cfg, limit=5)  # a part is read, never cached
    assert len(reads) == 1
    shard = split_with_problems / "train1-000000.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert len(vision.VisionTask().read_labelled(str(split_with_problems), cfg).labels) == 21 and len(reads) == 2


def test_reading_an_evaluation_split_opens_its_manifest_once(split_with_problems, monkeypatch):
    import selfsup.data.reader as reader
    import selfsup.tasks.vision as vision
    from selfsup.config import parse_config

    opened = []
    real = reader.open_read
    monkeypatch.setattr(reader, "open_read", lambda url, *a: opened.append(url) or real(url, *a))
    cfg = parse_config({"name": "c", "data": {"train": str(split_with_problems)}, "method": {"name": "simclr"}})
    split = vision.VisionTask().read_labelled(str(split_with_problems), cfg)  # a cache miss: decoded
    manifest = f"{split_with_problems}/{reader.MANIFEST}"
    assert opened.count(manifest) == 1 and len(split.labels) == 21
    assert [s["name"] for s in split.identity["shards"]] == [
        s["name"] for s in reader.read_manifest(str(split_with_problems))[0]["shards"]
    ]
    assert all(s["file"] for s in split.identity["shards"] if (split_with_problems / s["name"]).exists())
