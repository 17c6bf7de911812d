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
    set_rng_state,
    tidy_checkpoints,
)
from tests.helpers import save_at, train_state

CFG = parse_config({"name": "t", "data": {"train": "x"}, "method": {"name": "simclr"}})


def test_round_trip_keeps_weights_state_and_rng(tmp_path):
    model = {"w": torch.randn(3, 3)}
    path = save_at(tmp_path, CFG, 7, model, keep=2)  # train_state draws the RNG state here
    expected = torch.rand(4)
    assert path.name == "samples-000000000056"  # named by samples seen, not by a world-size-dependent step
    torch.rand(10)
    cfg, m, s = load_checkpoint(path, with_state=True)
    assert cfg == CFG and torch.equal(m["w"], model["w"]) and s.step == 7 and s.samples_seen == 56
    set_rng_state(s.rng[0])
    assert torch.equal(torch.rand(4), expected)


def test_write_order_decides_latest_and_pruning_not_the_name(tmp_path):
    # an elastic 1 -> 2 scale-up: the old run's step numbers are larger than the new one's
    save_at(tmp_path, CFG, 260, seq=1, samples=2080, keep=2)
    save_at(tmp_path, CFG, 280, seq=2, samples=2240, keep=2)
    third = save_at(tmp_path, CFG, 140, seq=3, samples=2240 + 160, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["samples-000000002240", "samples-000000002400"]
    assert latest_checkpoint(tmp_path) == third == resolve_checkpoint(tmp_path)
    assert load_checkpoint(third)[0] == CFG


def test_half_written_checkpoints_are_ignored_interrupted_prunes_finished_and_damaged_ones_kept(tmp_path):
    done = save_at(tmp_path, CFG, 1, keep=3)
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
    assert tidy_checkpoints(tmp_path) == [".tmp-samples-000000000024-1", "samples-000000000016", "samples-000000000032"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [done.name]
    kept = tmp_path / "corrupt" / "samples-000000000016"  # the damaged one is kept, byte for byte
    assert (kept / "model.pt").read_bytes() == b"x" and (kept / "state.pt").read_bytes() == (
        done / "state.pt"
    ).read_bytes()


def test_a_full_disk_is_one_line_naming_the_path_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    first = save_at(tmp_path, CFG, 1, {"w": torch.zeros(1000)}, keep=2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 1000))
    with pytest.raises(
        CheckpointSpaceError,
        match=r"not enough space for the next checkpoint in .*checkpoints: it "
        r"needs about 0 MiB, 0 MiB are free",
    ):
        save_at(tmp_path, CFG, 2, {"w": torch.zeros(1000)}, keep=2)
    assert list_checkpoints(tmp_path) == [first] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_write_that_runs_out_of_space_leaves_nothing_behind(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 30))

    def full(*args, **kwargs):
        monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 4096))
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(CheckpointSpaceError, match="no space left for a checkpoint in .*checkpoints"):
        save_at(tmp_path, CFG, 1, keep=2)
    assert not list((tmp_path / "checkpoints").iterdir())


def test_a_pickle_payload_is_refused(tmp_path):
    path = save_at(tmp_path, CFG, 1, keep=1)

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
    first = save_at(tmp_path, CFG, 1, {"w": torch.zeros(2)}, keep=3)
    second = save_at(tmp_path, CFG, 2, {"w": torch.ones(2)}, keep=3)
    verify = ck.verify_checkpoint

    def pruned_meanwhile(path, names=None):  # another driver's prune lands between the listing and the read
        if path == second:
            shutil.rmtree(second)
        return verify(path, names)

    monkeypatch.setattr(ck, "verify_checkpoint", pruned_meanwhile)
    decided = ck.decide_resume(tmp_path)
    assert decided.checkpoint == first and decided.samples_seen == 8
    assert (
        decided.reason == f"resuming from {first} (step 1), the latest good checkpoint; passed over: "
        f"{second.name} pruned while read"
    )
    monkeypatch.setattr(ck, "verify_checkpoint", verify)
    with pytest.raises(CheckpointError, match="does not exist"):  # the one-line error, not a KeyError
        load_checkpoint(second, with_state=True)


def test_the_records_round_trip_and_progress_is_derived_from_the_state(tmp_path):
    state = train_state(5, seq=2, samples=72, ranks=3)
    path = save_at(tmp_path, CFG, 5, seq=2, samples=72, ranks=3)
    progress = ck.CheckpointProgress.read(path)
    assert (progress.seq, progress.samples_seen, progress.step, progress.world_size) == (2, 72, 5, 3)
    assert sorted(progress.files) == ["config.yaml", "metrics.json", "model.pt", "state.pt"]
    assert progress.digests["state.pt"] == ck.file_digest(path / "state.pt")
    loaded = load_checkpoint(path, with_state=True)[2]
    assert (loaded.samples_seen, loaded.checkpoints_written, len(loaded.rng)) == (72, 2, 3)
    assert state.progress() == ck.CheckpointProgress(
        seq=2, samples_seen=72, step=5, epoch=0, step_in_epoch=5, world_size=3
    )
    old = {**state.to_dict(), "data_health": {"skipped": 1}}  # a key older checkpoints wrote is ignored
    assert ck.TrainState.from_dict(old).step == 5
    with pytest.raises(CheckpointError, match="x/state.pt: not a selfsup training state"):
        ck.TrainState.from_dict({"step": 1}, "x/state.pt")


def test_the_resume_decision_says_why(tmp_path):
    assert ck.decide_resume(tmp_path) == ck.Resume(None, 0, "no complete checkpoint yet: starting afresh")
    only = save_at(tmp_path, CFG, 1, {"w": torch.zeros(2)})
    damaged = bytearray((only / "model.pt").read_bytes())
    damaged[-1] ^= 1
    (only / "model.pt").write_bytes(bytes(damaged))  # same size: looks complete
    decided = ck.decide_resume(tmp_path)
    kept = tmp_path / "corrupt" / only.name
    assert decided == ck.Resume(
        None, 0, f"no good checkpoint left ({only.name} damaged, kept in {kept}): starting afresh"
    )
    assert (kept / "model.pt").read_bytes() == bytes(damaged) and not list_checkpoints(tmp_path)
