"""Checkpoint directories: atomic, complete or ignored, ordered and pruned by write order (never by
name), refused when the disk cannot hold the next one, and loaded without pickle."""

import json
import pickle
import shutil
from collections import namedtuple

import pytest
import torch

from selfsup.config import parse_config
from selfsup.core import checkpoint as ck
from selfsup.core.checkpoint import (
    CheckpointError,
    CheckpointSpaceError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tidy_checkpoints,
)
from tests.conftest import progress_at

CFG = parse_config({"name": "t", "data": {"train": "x"}, "method": {"name": "simclr"}})


def test_round_trip_keeps_weights_state_and_rng(tmp_path):
    model = {"w": torch.randn(3, 3)}
    state = {"step": 7, "epoch": 1, "step_in_epoch": 2, "optimizer": {"state": {}, "param_groups": []},
             "rng": [rng_state()]}
    expected = torch.rand(4)
    path = save_checkpoint(tmp_path, model, state, CFG, {"loss": 1.5}, progress_at(7), keep=2)
    assert path.name == "samples-000000000056"  # named by samples seen, not by a world-size-dependent step
    torch.rand(10)
    cfg, m, s = load_checkpoint(path, with_state=True)
    assert cfg == CFG and torch.equal(m["w"], model["w"]) and s["step"] == 7
    set_rng_state(s["rng"][0])
    assert torch.equal(torch.rand(4), expected)


def test_write_order_decides_latest_and_pruning_not_the_name(tmp_path):
    # an elastic 1 -> 2 scale-up: the old run's step numbers are larger than the new one's
    save_checkpoint(tmp_path, {}, {}, CFG, {}, progress_at(260, seq=1, samples=2080), keep=2)
    save_checkpoint(tmp_path, {}, {}, CFG, {}, progress_at(280, seq=2, samples=2240), keep=2)
    third = save_checkpoint(tmp_path, {}, {}, CFG, {}, progress_at(140, seq=3, samples=2240 + 160), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["samples-000000002240", "samples-000000002400"]
    assert latest_checkpoint(tmp_path) == third == resolve_checkpoint(tmp_path)
    assert load_checkpoint(third)[0] == CFG


def test_half_written_checkpoints_are_ignored_interrupted_prunes_finished_and_damaged_ones_kept(tmp_path):
    done = save_checkpoint(tmp_path, {}, {}, CFG, {}, progress_at(1), keep=3)
    partial = shutil.copytree(done, tmp_path / "checkpoints" / "samples-000000000016")
    (partial / "model.pt").write_bytes(b"x")  # a copy cut short: sizes differ from progress.json
    (partial / "progress.json").write_text((done / "progress.json").read_text().replace('"seq": 1', '"seq": 2'))
    pruned = shutil.copytree(done, tmp_path / "checkpoints" / "samples-000000000032")
    (pruned / "model.pt").unlink()  # a prune killed half-way: some files gone
    (pruned / "state.pt").unlink()
    (tmp_path / "checkpoints" / ".tmp-samples-000000000024-1").mkdir()  # a write that crashed half-way
    assert list_checkpoints(tmp_path) == [done]
    with pytest.raises(CheckpointError, match="not a complete selfsup checkpoint"):
        resolve_checkpoint(partial)
    assert tidy_checkpoints(tmp_path) == [".tmp-samples-000000000024-1", "samples-000000000016",
                                          "samples-000000000032"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [done.name]
    kept = tmp_path / "corrupt" / "samples-000000000016"  # the damaged one is kept, byte for byte
    assert (kept / "model.pt").read_bytes() == b"x" and (kept / "state.pt").read_bytes() == (done / "state.pt").read_bytes()


def test_a_full_disk_is_one_line_naming_the_path_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, {"w": torch.zeros(1000)}, {}, CFG, {}, progress_at(1), keep=2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 1000))
    with pytest.raises(CheckpointSpaceError, match=r"not enough space for the next checkpoint in .*checkpoints: it "
                                                   r"needs about 0 MiB, 0 MiB are free"):
        save_checkpoint(tmp_path, {"w": torch.zeros(1000)}, {}, CFG, {}, progress_at(2), keep=2)
    assert list_checkpoints(tmp_path) == [first] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_write_that_runs_out_of_space_leaves_nothing_behind(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 30))

    def full(*args, **kwargs):
        monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 4096))
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(CheckpointSpaceError, match="no space left for a checkpoint in .*checkpoints"):
        save_checkpoint(tmp_path, {}, {}, CFG, {}, progress_at(1), keep=2)
    assert not list((tmp_path / "checkpoints").iterdir())


def test_a_pickle_payload_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, {}, {}, CFG, {}, progress_at(1), keep=1)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (path / "model.pt").write_bytes(pickle.dumps({"w": Evil()}))
    progress = ck.read_progress(path)
    progress["files"]["model.pt"] = (path / "model.pt").stat().st_size  # a complete, but hostile, checkpoint
    progress[ck.DIGEST]["model.pt"] = ck.file_digest(path / "model.pt")
    (path / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(CheckpointError, match="cannot load safely"):
        load_checkpoint(path)


def test_missing_and_foreign_paths_get_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a complete selfsup checkpoint"):
        resolve_checkpoint(tmp_path)


def test_a_checkpoint_pruned_between_listing_and_reading_is_passed_over(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, {"w": torch.zeros(2)}, {}, CFG, {}, progress_at(1), keep=3)
    second = save_checkpoint(tmp_path, {"w": torch.ones(2)}, {}, CFG, {}, progress_at(2), keep=3)
    verify = ck.verify_checkpoint

    def pruned_meanwhile(path, names=None):  # another driver's prune lands between the listing and the read
        if path == second:
            shutil.rmtree(second)
        return verify(path, names)

    monkeypatch.setattr(ck, "verify_checkpoint", pruned_meanwhile)
    assert ck.resume_point(tmp_path) == first
    monkeypatch.setattr(ck, "verify_checkpoint", verify)
    with pytest.raises(CheckpointError, match="does not exist"):  # the one-line error, not a KeyError
        load_checkpoint(second, with_state=True)
