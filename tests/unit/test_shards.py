import json

import numpy as np
import pytest

from selfsup.cli import main
from selfsup.pipelines import sources
from selfsup.pipelines.shards import ManifestError, read_manifest, shards_info, verify_shards
from tests.conftest import make_images, write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_pair_to_shards_verify_and_info(tmp_path, gz, capsys):
    images, labels = make_images(23)
    img = write_idx(tmp_path / "imgs-idx3-ubyte", images, gz)
    lab = write_idx(tmp_path / "labs-idx1-ubyte", labels, gz)
    assert main(["shards", "write", "idx", str(img), str(lab), str(tmp_path / "out"), "--per-shard", "10",
                 "--classes", "a,b,c,d"]) == 0
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
    for split, (img, lab) in sources.FASHION_MNIST_FILES.items():
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
