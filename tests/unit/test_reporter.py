"""The Reporter fan-out, the file sink, and the capabilities objectives declare to the loop."""

from __future__ import annotations

import json

import pytest
import torch

from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining
from selfsup.config import Wav2Vec2Config, parse_config
from selfsup.core.objective import Objective, Progress
from selfsup.core.reporter import FileReporter, Reporters
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
    assert calls == [("a", "log", 2), ("b", "log", 2), ("a", "checkpoint", 2, tmp_path / "step-2"),
                     ("b", "checkpoint", 2, tmp_path / "step-2")]
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 2, "loss": 1.5}]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 2}


METHODS = {"simclr": {}, "moco_v2": {"queue_size": 64}, "moco_v3": {}, "byol": {}, "simsiam": {"sync_bn": False}}


@pytest.mark.parametrize("name", METHODS)
def test_a_vision_method_declares_syncbn_ddp_and_its_collapse_monitor(tmp_path, name):
    cfg = parse_config({"name": "caps", "run_root": str(tmp_path), "data": {"train": str(tmp_path)},
                        "model": {"width": 4}, "method": {"name": name, "proj_dim": 8, **METHODS[name]}})
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
