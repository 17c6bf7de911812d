import pickle

import pytest
import torch

from selfsup.config import parse_config
from selfsup.core.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                          resolve_checkpoint, rng_state, save_checkpoint, set_rng_state)

CFG = parse_config({"name": "t", "data": {"train": "x"}, "method": {"name": "simclr"}})


def test_round_trip_keeps_weights_state_and_rng(tmp_path):
    model = {"w": torch.randn(3, 3)}
    state = {"step": 7, "epoch": 1, "step_in_epoch": 2, "optimizer": {"state": {}, "param_groups": []},
             "rng": [rng_state()]}
    expected = torch.rand(4)
    path = save_checkpoint(tmp_path, 7, model, state, CFG, {"loss": 1.5}, keep=2)
    torch.rand(10)
    cfg, m, s = load_checkpoint(path, with_state=True)
    assert cfg == CFG and torch.equal(m["w"], model["w"]) and s["step"] == 7
    set_rng_state(s["rng"][0])
    assert torch.equal(torch.rand(4), expected)


def test_only_the_newest_are_kept_and_temp_dirs_are_ignored(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {}, {"step": step}, CFG, {}, keep=2)
    (tmp_path / "checkpoints" / ".tmp-step-00000009-1").mkdir()  # a write that crashed half-way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert resolve_checkpoint(tmp_path) == latest_checkpoint(tmp_path)


def test_a_pickle_payload_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, {}, {}, CFG, {}, keep=1)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (path / "model.pt").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="cannot load safely"):
        load_checkpoint(path)


def test_missing_and_foreign_paths_get_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a selfsup checkpoint"):
        resolve_checkpoint(tmp_path)
