"""The cache under a full disk and an unwritable root: one warning, nothing left behind, the work done anyway."""

import logging
import os
from pathlib import Path

import pytest
import torch

from selfsup.core import cache

FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk; works as root too


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_a_full_cache_disk_is_one_warning_and_the_next_command_writes(own_cache, monkeypatch, caplog):
    key = cache.digest("split", 1)
    tmp = cache.entry_path("decoded", key)
    tmp.parent.mkdir(parents=True)
    tmp = tmp.with_name(f".{tmp.name}.{os.getpid()}.tmp")
    tmp.symlink_to(FULL)  # torch.save's temporary file is the full disk: a real RuntimeError from its writer
    value = {"images": torch.arange(4096, dtype=torch.uint8)}
    with caplog.at_level(logging.WARNING, logger="selfsup.cache"):
        cache.store_cached("decoded", key, value)
        cache.store_cached("baselines", cache.digest("other"), {"x": 1.0})  # not tried again in this process
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cannot write the cache" in lines[0] and str(own_cache) in lines[0]
    assert "RuntimeError" in lines[0]
    assert not tmp.exists() and not tmp.is_symlink()  # the temporary file is removed
    assert cache.load_cached("decoded", key) is None and not (own_cache / "baselines").exists()
    monkeypatch.setattr(cache, "_unwritable", set())  # the next command, with space freed
    cache.store_cached("decoded", key, value)
    assert torch.equal(cache.load_cached("decoded", key)["images"], value["images"])


def test_a_cache_root_that_cannot_be_created_is_one_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "a-file" / "cache"))  # mkdir fails, as root too
    with caplog.at_level(logging.WARNING, logger="selfsup.cache"):
        for i in range(3):
            cache.store_cached("decoded", cache.digest(i), {"x": torch.zeros(2)})
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "NotADirectoryError" in caplog.records[0].getMessage()
    assert cache.load_cached("decoded", cache.digest(0)) is None


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_an_evaluation_split_is_read_under_a_full_cache(tmp_path, monkeypatch, caplog):
    import selfsup.tasks.vision as vision
    from selfsup.config import parse_config
    from tests.helpers import write_tiny_shards

    split = write_tiny_shards(tmp_path / "s", [10, 14])

    real = torch.save
    monkeypatch.setattr(cache.torch, "save", lambda obj, f: real(obj, str(FULL)))  # every entry hits a full disk
    cfg = parse_config({"name": "c", "data": {"train": str(split)}, "method": {"name": "simclr"}})
    with caplog.at_level(logging.WARNING, logger="selfsup.cache"):
        read = vision.VisionTask().read_labelled(str(split), cfg)
    assert len(read.labels) == 24 and read.problems == []  # as with a working cache
    assert len([r for r in caplog.records if r.name == "selfsup.cache"]) == 1


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_eval_under_a_full_cache_is_one_warning_and_its_report(tmp_path, monkeypatch, capsys):
    import json

    from selfsup import cli
    from tests.helpers import tiny_config, write_config, write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards", [16])
    config = write_config(tmp_path / "x.yaml", tiny_config("x", shards, tmp_path / "runs"))
    assert cli.main(["pretrain", str(config), "--no-ray"]) == 0
    capsys.readouterr()
    real = torch.save
    monkeypatch.setattr(
        cache.torch, "save", lambda obj, f: real(obj, str(FULL)) if str(f).endswith(".tmp") else real(obj, f)
    )  # the cache's disk is full; the run's is not
    out = tmp_path / "report"
    argv = ["eval", str(tmp_path / "runs" / "x"), "--train", str(shards), "--test", str(shards), "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("cannot write the cache") == 1 and "Traceback" not in err
    assert json.loads((out / "report.json").read_text())["encoders"]
