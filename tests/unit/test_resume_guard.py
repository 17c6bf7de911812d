"""Re-running a run name with another config is refused before any training, naming each changed key
with its old and new value; keys in ``RESUMABLE_KEYS`` may change; ``--restart`` sets the old run aside
(never deleting its weights) and starts afresh."""

from __future__ import annotations

import pytest

from selfsup import cli
from selfsup.cluster import driver, ray_driver
from selfsup.cluster.driver import RunFailed, set_aside
from selfsup.config import RESUMABLE_KEYS, _leaves, config_differences, load_config, parse_config
from selfsup.core.checkpoint import latest_checkpoint, list_checkpoints
from tests.helpers import tiny_config, write_config, write_tiny_shards


def test_config_differences_name_each_changed_key_with_both_values():
    old = {
        "model": {"width": 8, "backbone": "resnet18"},
        "optim": {"lr": 0.1, "epochs": 1},
        "scaling": {"num_workers": 1},
    }
    new = {
        "model": {"width": 16, "backbone": "resnet18"},
        "optim": {"lr": 0.1, "epochs": 5},
        "scaling": {"num_workers": [1, 4]},
    }
    assert config_differences(old, new) == {"model.width": (8, 16)}  # a longer plan and a resize may change
    assert config_differences(old, new, allowed=()) == {
        "model.width": (8, 16),
        "optim.epochs": (1, 5),
        "scaling.num_workers": (1, [1, 4]),
    }


def test_keys_both_sides_have_come_before_those_of_one_method_only(tmp_path):
    tree = tiny_config("x", tmp_path, tmp_path)
    simclr = parse_config(tree).model_dump(mode="json")
    byol = parse_config(tree, ["method.name=byol", "optim.lr=0.5"]).model_dump(mode="json")
    changed = config_differences(simclr, byol)
    keys = list(changed)
    assert keys[0] == "method.name" and keys.index("optim.lr") < keys.index("method.tau_base")  # one method's last
    assert changed["method.name"] == ("simclr", "byol") and changed["optim.lr"] == (0.1, 0.5)
    assert changed["method.tau_base"] == (None, 0.99) and changed["method.temperature"] == (0.2, None)


def test_every_resumable_key_names_a_config_key_or_section(tmp_path):
    keys = _leaves(parse_config(tiny_config("x", tmp_path, tmp_path)).model_dump(mode="json"))
    for allowed in RESUMABLE_KEYS:
        assert any(k == allowed or k.startswith(f"{allowed}.") for k in keys), allowed


def test_restart_of_a_run_in_a_bucket_is_refused_in_one_line(tmp_path):
    cfg = parse_config(tiny_config("x", tmp_path, "s3://bucket/runs"))
    with pytest.raises(RunFailed, match="only works for a local run_root; for s3://bucket/runs/x pick another name"):
        set_aside(cfg)


def _files(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_a_changed_config_is_refused_a_longer_plan_resumes_and_restart_starts_afresh(tmp_path, capsys, monkeypatch):
    shards = write_tiny_shards(tmp_path / "shards", [16])  # 2 steps of batch 8 an epoch
    path = write_config(tmp_path / "x.yaml", tiny_config("x", shards, tmp_path / "runs", model={"width": 8}))
    run = tmp_path / "runs" / "x"
    (tmp_path / "beside-runs.txt").write_text("keep me")  # --restart moves nothing outside the run's folder
    assert cli.main(["pretrain", str(path), "--no-ray"]) == 0
    ckpt = latest_checkpoint(run)
    before = _files(ckpt)
    capsys.readouterr()

    assert cli.main(["pretrain", str(path), "--no-ray", "model.width=16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: ") and err.count("\n") == 1  # one line, no traceback
    assert f"{run} has checkpoints trained with model.width=8; this config says 16." in err
    assert f"pass --restart to start afresh (the old run is kept as {run}.old-<time>)" in err
    assert list_checkpoints(run) == [ckpt] and _files(ckpt) == before  # untouched
    monkeypatch.setattr(ray_driver, "init_ray", lambda *a, **k: pytest.fail("started Ray before refusing"))
    with pytest.raises(RunFailed, match="model.width=8; this config says 16"):  # under Ray: before Ray starts
        driver.pretrain(load_config(path, ["model.width=16"]))

    assert cli.main(["pretrain", str(path), "--no-ray", "optim.epochs=2", "train.log_every_steps=2"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out  # resumed at step 2: a longer plan is no other config
    trained = {c.name: _files(c) for c in list_checkpoints(run)}

    assert cli.main(["pretrain", str(path), "--no-ray", "model.width=16", "--restart"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out  # afresh
    (kept,) = tmp_path.joinpath("runs").glob("x.old-*")
    assert {c.name: _files(c) for c in list_checkpoints(kept)} == trained  # the old weights, all kept
    assert (kept / "metrics.jsonl").is_file() and not (kept / "lease.json").exists()
    assert load_config(latest_checkpoint(run) / "config.yaml").model.width == 16
    assert not (run / "lease.json").exists()  # released as usual
    assert (tmp_path / "beside-runs.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside-runs.txt", "runs", "shards", "x.yaml"]
