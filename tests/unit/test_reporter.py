"""The Reporter fan-out, the file sink, and the capabilities objectives declare to the loop."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining
from selfsup.config import Wav2Vec2Config, parse_config
from selfsup.core.objective import Objective, Progress
from selfsup.core.reporter import FileReporter, Reporters, read_records, truncate_records
from selfsup.tasks.vision import VisionTask


class Recorder:
    """A sink that implements only ``log`` and ``checkpoint``."""

    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def log(self, step, metrics):
        self.calls.append((self.name, "log", step))

    def checkpoint(self, step, path, metrics):
        self.calls.append((self.name, "checkpoint", step, path))


def test_each_call_goes_to_every_sink_that_implements_it_in_order(tmp_path):
    calls: list = []
    reporter = Reporters(Recorder(calls, "a"), FileReporter(tmp_path), Recorder(calls, "b"))
    reporter.log(2, {"loss": 1.5})
    reporter.checkpoint(2, tmp_path / "step-2", {"loss": 1.5})
    reporter.finish({"steps": 2})
    assert calls == [
        ("a", "log", 2),
        ("b", "log", 2),
        ("a", "checkpoint", 2, tmp_path / "step-2"),
        ("b", "checkpoint", 2, tmp_path / "step-2"),
    ]
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 2, "loss": 1.5}]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 2}


METHODS = {"simclr": {}, "moco_v2": {"queue_size": 64}, "moco_v3": {}, "byol": {}, "simsiam": {"sync_bn": False}}


@pytest.mark.parametrize("name", METHODS)
def test_a_vision_method_declares_syncbn_ddp_and_its_collapse_monitor(tmp_path, name):
    cfg = parse_config(
        {
            "name": "caps",
            "run_root": str(tmp_path),
            "data": {"train": str(tmp_path)},
            "model": {"width": 4},
            "method": {"name": name, "proj_dim": 8, **METHODS[name]},
        }
    )
    objective = VisionTask().build_objective(cfg)
    assert isinstance(objective, Objective)
    assert objective.sync_batchnorm is getattr(cfg.method, "sync_bn", False) and not objective.find_unused_parameters
    (monitor,) = objective.health_monitors()
    views = [torch.rand(4, 1, 28, 28) for _ in range(2)]
    assert monitor.name == "collapse" and monitor.dim == objective(views, Progress(0, 1))["embedding"].shape[1]


@pytest.mark.parametrize("layer_drop", [0.0, 0.1])
def test_wav2vec2_asks_ddp_for_unused_parameters_only_with_layerdrop(layer_drop):
    objective = Wav2Vec2Pretraining(Wav2Vec2Config.tiny().model_copy(update={"layer_drop": layer_drop}))
    assert objective.find_unused_parameters is (layer_drop > 0) and objective.sync_batchnorm is False
    assert [m.name for m in objective.health_monitors()] == ["codebook"]


def test_an_append_cut_short_by_a_full_disk_is_undone_in_one_line(tmp_path, monkeypatch):
    from selfsup.core import reporter as reporter_module
    from selfsup.core.checkpoint import CheckpointSpaceError

    sink = FileReporter(tmp_path)
    sink.log(1, {"loss": 1.5, "samples": 8})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    write = reporter_module.os.write

    def full(fd, data):  # the disk fills half-way through the record
        write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reporter_module.os, "write", full)
    with pytest.raises(
        CheckpointSpaceError,
        match=r"no space left to append to .*metrics.jsonl \(the record was "
        r"not written\)",
    ) as err:
        sink.log(2, {"loss": 1.25, "samples": 16})
    assert "\n" not in str(err.value)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # not a byte of the torn record is left
    monkeypatch.setattr(reporter_module.os, "write", write)
    sink.log(2, {"loss": 1.25, "samples": 16})  # space again: the next append works
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_torn_last_line_is_dropped_with_a_warning_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "samples": 8}\n{"step": 2, "samples": 16}\n{"step": 3, "sam')
    assert [r["step"] for r in read_records(path)] == [1, 2]
    assert "metrics.jsonl: dropped its last line, a record cut short by an interrupted write" in caplog.text
    truncate_records(path, 16)
    assert path.read_text() == '{"step": 1, "samples": 8}\n{"step": 2, "samples": 16}\n'
    FileReporter(tmp_path).log(3, {"samples": 24})
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]
