"""Folders a command cannot write are refused before any work, in one line naming the folder and the fix:
the run folder (pretrain), the report folder (eval), and a HOME that W&B and a Ray of its own write in.

Tests often run as root, where a chmod'ed folder is still writable (and so is no refusal, since the
writes would succeed too). The folder that cannot be written here is one under a regular file: mkdir
and every write fail with "Not a directory" for root as for anyone. A chmod 0o555 case runs too, but
only for a user that it stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfsup import cli
from selfsup.core.checkpoint import latest_checkpoint
from tests.helpers import tiny_config, write_config, write_tiny_shards


def _blocked(tmp_path: Path, how: str) -> Path:
    """A folder path that cannot be written: under a regular file, or inside a chmod 0o555 folder."""
    if how == "under-a-file":
        (tmp_path / "a-file").write_text("not a folder")
        return tmp_path / "a-file" / "inside"
    if os.geteuid() == 0:
        pytest.skip("root writes in a chmod 0o555 folder")
    (tmp_path / "read-only").mkdir(mode=0o555)
    return tmp_path / "read-only" / "inside"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("selfsup: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Taking the run's lease (the first thing pretrain does) or evaluating fails the test."""
    import selfsup.eval.run
    import selfsup.train.lease

    monkeypatch.setattr(selfsup.train.lease, "run_lease", lambda cfg: pytest.fail("started the run"))
    monkeypatch.setattr(selfsup.eval.run, "evaluate", lambda *a, **k: pytest.fail("evaluated"))


@pytest.mark.parametrize("how", ["under-a-file", "chmod"])
def test_a_run_folder_that_cannot_be_written_is_refused_before_the_run(tmp_path, how, capsys, no_work):
    runs = _blocked(tmp_path, how)
    config = write_config(tmp_path / "x.yaml", tiny_config("x", tmp_path / "shards", runs))
    assert cli.main(["pretrain", str(config), "--no-ray"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"selfsup: error: {runs / 'x'} is not writable (")
    assert line.endswith(
        "); pretrain writes the run there (its lease, checkpoints, metrics): make it writable, "
        "or set run_root to another folder"
    )


def test_a_home_that_cannot_be_written_is_refused_for_wandb_and_ray_and_not_needed_without(
    tmp_path, capsys, monkeypatch
):
    shards = write_tiny_shards(tmp_path / "shards", [16])
    home = _blocked(tmp_path, "under-a-file")
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    tree = tiny_config("x", shards, tmp_path / "runs")
    offline = write_config(tmp_path / "offline.yaml", {**tree, "tracking": {"mode": "offline"}})
    with monkeypatch.context() as m:
        import selfsup.train.lease

        m.setattr(selfsup.train.lease, "run_lease", lambda cfg: pytest.fail("started the run"))
        assert cli.main(["pretrain", str(offline), "--no-ray"]) == 2
        assert _one_error_line(capsys) == (
            f"selfsup: error: {home}/.config/wandb is not writable (Not a directory); set WANDB_CONFIG_DIR to a "
            "writable folder, or set tracking.mode=disabled (W&B writes there with tracking.mode=offline)"
        )
        disabled = write_config(tmp_path / "disabled.yaml", tree)
        assert cli.main(["pretrain", str(disabled)]) == 2  # a Ray of its own
        assert _one_error_line(capsys) == (
            f"selfsup: error: {home}/.ray is not writable (Not a directory); a Ray of its own writes its token and "
            "settings there: set HOME to a writable folder, or pass --no-ray"
        )

    assert cli.main(["pretrain", str(disabled), "--no-ray"]) == 0  # what needs no HOME runs
    assert latest_checkpoint(tmp_path / "runs" / "x") is not None
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # as the line says: W&B moved out of HOME
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert cli.main(["pretrain", str(offline), "--no-ray", "name=y"]) == 0
    assert list((tmp_path / "runs" / "y" / "wandb").glob("offline-run-*"))


def test_a_report_folder_that_cannot_be_written_is_refused_before_evaluating(tmp_path, capsys, monkeypatch):
    shards = write_tiny_shards(tmp_path / "shards", [16])
    config = write_config(tmp_path / "x.yaml", tiny_config("x", shards, tmp_path / "runs"))
    assert cli.main(["pretrain", str(config), "--no-ray"]) == 0
    capsys.readouterr()
    import selfsup.eval.run

    monkeypatch.setattr(selfsup.eval.run, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    out = _blocked(tmp_path, "under-a-file")
    run = tmp_path / "runs" / "x"
    assert cli.main(["eval", str(run), "--train", str(shards), "--test", str(shards), "--out", str(out)]) == 2
    assert _one_error_line(capsys) == (
        f"selfsup: error: {out} is not writable (Not a directory); eval writes its "
        "report there: pass --out with a writable folder"
    )
