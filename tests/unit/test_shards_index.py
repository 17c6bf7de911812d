"""`selfsup shards index`: a folder of plain WebDataset tars (webdataset.TarWriter, `tar`) gets the
manifest the reader needs, and the training stream and the Trainer read it as written."""

from __future__ import annotations

import functools
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from selfsup.cli import main
from selfsup.data.decode import collate_images, decode_native
from selfsup.data.reader import ManifestError, read_manifest, read_split
from selfsup.data.shards import index_shards, sha256_file
from selfsup.data.sources import encode_png
from selfsup.data.stream import ShardStream
from tests.helpers import fit, make_images, tiny_experiment

N_WRITER, N_TAR = 14, 10  # samples in the TarWriter shard and in the `tar`-style shard


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def plain_tars(tmp_path) -> tuple[Path, np.ndarray]:
    """Two tars with no manifest: one by webdataset.TarWriter, one as `tar -cf` lays out files in a
    sub-folder (``imgs/000014.png``, ``imgs/000014.cls``); 24 28x28 grey PNGs of 4 classes."""
    images, labels = make_images(N_WRITER + N_TAR, seed=5)
    root = tmp_path / "wds"
    root.mkdir()
    with wds.TarWriter(str(root / "part-a.tar")) as writer:
        for i in range(N_WRITER):
            writer.write({"__key__": f"{i:06d}", "png": encode_png(images[i]), "cls": int(labels[i])})
    with tarfile.open(root / "part-b.tar", "w") as tf:
        for i in range(N_WRITER, N_WRITER + N_TAR):
            _add(tf, f"imgs/{i:06d}.png", encode_png(images[i]))
            _add(tf, f"imgs/{i:06d}.cls", str(int(labels[i])).encode())
    return root, labels


def test_a_folder_without_manifest_says_to_index_it(plain_tars, capsys):
    root, _ = plain_tars
    with pytest.raises(ManifestError, match=f"run `selfsup shards index {root}`"):
        read_manifest(str(root))
    assert main(["shards", "verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"selfsup shards index {root}" in err and "Traceback" not in err


def test_index_records_counts_checksums_and_sizes_and_leaves_the_tars_alone(plain_tars, capsys):
    root, labels = plain_tars
    before = {p.name: p.read_bytes() for p in root.glob("*.tar")}
    assert main(["shards", "index", str(root), "--classes", "a,b,c,d"]) == 0
    assert (
        f"indexed {N_WRITER + N_TAR} image samples of split 'wds' in 2 shards (0 unreadable)" in capsys.readouterr().out
    )
    assert {p.name: p.read_bytes() for p in root.glob("*.tar")} == before
    manifest, urls = read_manifest(str(root))
    assert (manifest["format"], manifest["split"], manifest["classes"]) == ("image", "wds", list("abcd"))
    assert manifest["num_samples"] == N_WRITER + N_TAR
    assert [(s["name"], s["count"]) for s in manifest["shards"]] == [("part-a.tar", N_WRITER), ("part-b.tar", N_TAR)]
    for entry, url in zip(manifest["shards"], urls):
        assert entry["sha256"] == sha256_file(Path(url)) and entry["bytes"] == Path(url).stat().st_size
        assert entry["sizes"] == [[28, 28]] * entry["count"]
    # read back by the reader in order, and by the training stream (every sample once per epoch)
    items, _, problems = read_split(str(root), lambda s: int(s["cls"]))
    assert items == labels.tolist() and problems == []
    decode = functools.partial(decode_native, channels=1, width=28, height=28)
    stream = ShardStream(str(root), 4, decode, collate_images, shuffle=False)
    batches = list(stream)
    assert len(batches) == stream.steps_per_epoch() == (N_WRITER + N_TAR) // 4
    assert all(b["skipped"] == 0 for b in batches)
    assert Counter(int(y) for b in batches for y in b["labels"]) == Counter(labels.tolist())


def test_the_trainer_trains_on_indexed_tars(plain_tars, tmp_path):

    root, _ = plain_tars
    index_shards(root)
    cfg = tiny_experiment(
        "indexed",
        root,
        tmp_path / "runs",
        model={"width": 2},
        method={"proj_hidden_dim": 8, "proj_dim": 4},
        optim={"warmup_epochs": 0.1},
        train={"checkpoint_every_steps": 1000},
    )
    summary = fit(cfg)
    assert summary["steps"] == (N_WRITER + N_TAR) // 8 == 3
    assert summary["data"]["skipped"] == 0


def test_index_lists_samples_the_reader_will_skip(plain_tars, capsys):
    root, _ = plain_tars
    with wds.TarWriter(str(root / "part-c.tar")) as writer:
        writer.write({"__key__": "nolabel", "png": encode_png(np.zeros((9, 9), np.uint8))})
        writer.write({"__key__": "junk", "png": b"not a png", "cls": 1})
    assert main(["shards", "index", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}/part-c.tar: sample nolabel: needs .jpg or .png and .cls" in out
    assert (
        f"{root}/part-c.tar: sample junk: unreadable image header (UnidentifiedImageError: cannot identify image file)"
    ) in out
    manifest, _ = read_manifest(str(root))
    assert manifest["shards"][2]["count"] == 2 and manifest["shards"][2]["sizes"] == [None, None]  # each skipped
    assert manifest["classes"] == []


@pytest.mark.parametrize("case", ["manifest", "wav", "truncated", "empty", "missing", "classes"])
def test_what_cannot_be_indexed_is_one_line_naming_it(plain_tars, tmp_path, case, capsys):
    root, _ = plain_tars
    expected = {
        "manifest": f"{root} already has a manifest.json; delete it",
        "wav": "sample clip has ['cls', 'wav']; selfsup reads images as",
        "truncated": f"{root}/part-a.tar: unreadable after sample",
        "empty": f"{tmp_path / 'empty'} has no .tar files to index",
        "missing": f"{tmp_path / 'nowhere'} does not exist",
        "classes": "labels go up to 3 but --classes names 2 classes",
    }[case]
    args = [str(root)]
    if case == "manifest":
        (root / "manifest.json").write_text("{}")
    elif case == "wav":
        for p in root.glob("*.tar"):
            p.unlink()
        with wds.TarWriter(str(root / "audio.tar")) as writer:
            writer.write({"__key__": "clip", "wav": b"RIFF", "cls": 0})
    elif case == "truncated":
        shard = root / "part-a.tar"
        shard.write_bytes(shard.read_bytes()[:3000])
    elif case in ("empty", "missing"):
        (tmp_path / "empty").mkdir()
        args = [str(tmp_path / case if case == "empty" else tmp_path / "nowhere")]
    else:
        args += ["--classes", "a,b"]
    assert main(["shards", "index", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("selfsup: error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err
    if case != "manifest":
        assert not (root / "manifest.json").exists()


def test_index_reads_audio_durations_from_flac_headers(tmp_path):
    from selfsup.audio.decode import encode_flac
    from selfsup.data.decode import decode_audio_sample

    root = tmp_path / "speech"
    root.mkdir()
    seconds = [0.5, 0.25, 1.0]
    with wds.TarWriter(str(root / "speech-0.tar")) as writer:
        for i, s in enumerate(seconds):
            wave = 0.3 * np.sin(np.arange(int(16000 * s)) / 5).astype(np.float32)
            writer.write({"__key__": f"u{i}", "flac": encode_flac(wave), "json": {"label": i % 2, "speaker": "x"}})
    manifest, lines = index_shards(root, split="dev", classes=["no", "yes"])
    assert lines == [] and (manifest["format"], manifest["split"]) == ("audio", "dev")
    assert manifest["shards"][0]["durations"] == seconds
    stored = json.loads((root / "manifest.json").read_text())
    assert stored["num_samples"] == 3 and stored["classes"] == ["no", "yes"]
    labels, _, _ = read_split(str(root), functools.partial(decode_audio_sample, min_samples=400))
    assert [label for _, label in labels] == [0, 1, 0]


def test_the_split_is_the_one_given_the_manifests_the_tars_or_the_folders(plain_tars, capsys):
    """part-a.tar and part-b.tar share no name: the folder's (wds); val-000000.tar, val-000001.tar: val;
    --split wins."""
    root, _ = plain_tars

    def indexed(*args):
        assert main(["shards", "index", str(root), *args]) == 0
        return read_manifest(str(root))[0]["split"]

    assert indexed() == "wds"
    for i, tar in enumerate(sorted(root.glob("*.tar"))):
        tar.rename(root / f"val-{i:06d}.tar")
    (root / "manifest.json").unlink()
    assert indexed() == "val"
    (root / "manifest.json").unlink()
    assert indexed("--split", "test") == "test"
