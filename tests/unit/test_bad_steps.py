"""The training loop skips NaN/inf losses, counts them, and stops after too many in a row; a skipped
step leaves no trace in any objective (queue, EMA targets, DINO's center, BatchNorm statistics, optimiser)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.audio.decode import encode_flac
from selfsup.cluster.in_process import build_trainer
from selfsup.config import parse_config
from selfsup.core.checkpoint import latest_checkpoint, load_checkpoint
from selfsup.core.objective import Progress
from selfsup.data.shards import write_shards
from selfsup.methods.simclr import SimCLR
from selfsup.train.trainer import TooManyBadSteps, Trainer
from tests.helpers import TINY_WAV2VEC2, fit, tiny_experiment, write_tiny_shards


def tiny_config(tmp_path, *overrides):
    shards = write_tiny_shards(tmp_path / "shards", [64, 64])
    return tiny_experiment(
        "bad",
        shards,
        tmp_path / "runs",
        *overrides,
        data={"batch_size": 16, "shuffle_buffer": 0},
        method={"proj_hidden_dim": 16, "proj_dim": 8},
        optim={"warmup_epochs": 0, "max_bad_steps": 3},
        train={"precision": "fp32", "log_every_steps": 2, "checkpoint_every_steps": 1000},
    )


def train(cfg):
    return fit(cfg)


def test_a_diverging_run_stops_after_max_bad_steps(tmp_path):
    cfg = tiny_config(tmp_path, "optim.lr=1e30")  # the first update sends the weights to ~1e30: NaN from then on
    with pytest.raises(
        TooManyBadSteps, match=r"for \d+ steps in a row by step \d+ \(limit optim.max_bad_steps=3\)"
    ) as err:
        train(cfg)
    assert "lower optim.lr" in str(err.value)


@pytest.mark.parametrize("optimiser", ["lars", "sgd", "adamw"])
def test_isolated_bad_losses_are_skipped_and_counted(tmp_path, monkeypatch, optimiser):
    cfg = tiny_config(tmp_path, f"optim.name={optimiser}")
    calls = {"n": 0}
    forward = SimCLR.forward

    def sometimes_nan(self, views, progress):
        out = forward(self, views, progress)
        calls["n"] += 1
        if calls["n"] in (2, 4, 5):  # never 3 in a row
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "forward", sometimes_nan)
    summary = train(cfg)
    assert summary["steps"] == summary["total_steps"] == 8 and summary["bad_steps"] == 3
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bad_steps"] == 3
    _, model_state, _ = load_checkpoint(latest_checkpoint(cfg.run_dir))
    assert all(torch.isfinite(v).all() for v in model_state.values() if v.is_floating_point())


def test_the_loop_warns_when_embeddings_collapse(tmp_path, monkeypatch, caplog):
    cfg = tiny_config(tmp_path)
    forward = SimCLR.forward

    def collapsing(self, views, progress):
        out = forward(self, views, progress)
        if progress.step >= 4:  # from step 5 on every sample has the same embedding
            out["embedding"] = torch.ones_like(out["embedding"]) + 1e-6 * torch.randn_like(out["embedding"])
        return out

    monkeypatch.setattr(SimCLR, "forward", collapsing)
    with caplog.at_level(logging.WARNING, logger="selfsup.collapse"):
        train(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["collapse_alarms"] for r in records] == [0, 0, 1, 0]  # logged at steps 2, 4, 6, 8; warned once
    assert len(caplog.records) == 1 and "representation collapse: embed_std" in caplog.records[0].getMessage()


# ---- a NaN step changes nothing ----

HEADS = {  # small heads for a width-8 ResNet-18 (feature dimension 64)
    "simclr": ["method.proj_hidden_dim=16", "method.proj_dim=8"],
    "moco_v2": ["method.queue_size=32", "method.proj_hidden_dim=16", "method.proj_dim=8"],
    "moco_v3": ["method.proj_hidden_dim=16", "method.proj_dim=8", "method.pred_hidden_dim=16"],
    "byol": ["method.proj_hidden_dim=16", "method.proj_dim=8", "method.pred_hidden_dim=16"],
    "simsiam": ["method.proj_dim=16", "method.proj_hidden_dim=16", "method.pred_hidden_dim=4"],
    "vicreg": ["method.proj_hidden_dim=16", "method.proj_dim=16"],
    "barlow_twins": ["method.proj_hidden_dim=16", "method.proj_dim=16"],
    "dino": ["method.out_dim=32", "method.hidden_dim=16", "method.bottleneck_dim=8", "method.use_bn_in_head=true"],
}


def small_backbone(name, width, channels, *args, **kwargs) -> tuple[nn.Module, int]:
    """conv-BN-ReLU x 2, pooled: (B, C, H, W) -> (B, 16), with BatchNorm statistics to keep; a stand-in
    for ``build_backbone`` where what is tested is the same for every backbone."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ), 16


def audio_config(tmp_path):
    rng = np.random.default_rng(0)
    clips = (
        {
            "__key__": f"c{i}",
            "flac": encode_flac((0.1 * rng.standard_normal(8000)).astype(np.float32)),
            "json": {"duration": 0.5, "original_rate": 16000, "label": 0},
        }
        for i in range(8)
    )
    write_shards(clips, tmp_path / "audio", split="train", kind="audio", classes=["a"])
    return parse_config(
        {
            "name": "bad-w2v",
            "run_root": str(tmp_path / "runs"),
            "data": {
                "kind": "audio",
                "train": str(tmp_path / "audio"),
                "batch_size": 2,
                "max_seconds": 0.5,
                "min_seconds": 0.1,
                "loader_workers": 0,
            },
            "method": {**TINY_WAV2VEC2, "num_negatives": 4},
            "optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "none", "warmup_epochs": 0, "epochs": 1},
            "train": {"precision": "fp32", "threads": 1},
        }
    )


def batches(name: str) -> tuple[list, list, list]:
    """Two clean inputs and a non-finite one, built directly as the objective's input."""
    g = torch.Generator().manual_seed(0)
    if name == "wav2vec2":
        clean = [(0.1 * torch.randn(2, 8000, generator=g), torch.tensor([8000, 8000])) for _ in range(2)]
        bad = (clean[0][0].clone(), clean[0][1])
        bad[0][1, 100] = float("inf")
        return clean[0], bad, clean[1]
    clean = [[torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)] for _ in range(2)]
    bad = [v.clone() for v in clean[0]]
    bad[1][3, 0, 5, 5] = float("inf")
    return clean[0], bad, clean[1]


PROGRESS_DRIVEN = {"quantizer.temperature"}  # follows the step count, which a skipped step advances too


def run_steps(cfg, inputs: list) -> tuple[Trainer, torch.Tensor, list[dict]]:
    """Trainer.step on each input, None standing for a step the loop counts but never takes (what the loop
    does on a skipped step, without the batch). Returns the trainer, the last loss and the objective's
    state after each step."""
    trainer = build_trainer(cfg)
    trainer.to_input = lambda batch: batch  # the inputs are already the objective's
    states = []
    for i, batch in enumerate(inputs):
        torch.manual_seed(100 + i)  # the same randomness (masks, Shuffle-BN, Gumbel noise) in both runs
        if batch is None:
            trainer.steps_done += 1
            trainer.objective.on_after_step(Progress(trainer.steps_done, trainer.total_steps), torch.tensor(False))
        else:
            out = trainer.step(batch)
        states.append({k: v.clone() for k, v in trainer.objective.state_dict().items()})
    return trainer, out["loss"].detach(), states


def assert_same_tensors(a: dict, b: dict, what: str, skip: set[str] = frozenset()) -> None:
    assert a.keys() == b.keys()
    for k in a.keys() - skip:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("name", [*HEADS, "wav2vec2"])
def test_a_non_finite_batch_changes_nothing(tmp_path, name):
    cfg = (
        audio_config(tmp_path)
        if name == "wav2vec2"
        else tiny_config(tmp_path, f"method.name={name}", *HEADS[name], "model.width=8")
    )
    assert_a_non_finite_batch_changes_nothing(cfg, name)


@pytest.mark.parametrize("name", HEADS)
def test_bf16_autocast_accepts_and_rejects_steps_as_fp32_does(tmp_path, monkeypatch, name):
    """train.precision=bf16 on the CPU: the same autocast path a GPU takes, through each method's heads
    and losses (a small backbone: a CPU without native bf16 emulates it, slowly)."""
    monkeypatch.setattr("selfsup.tasks.vision.build_backbone", small_backbone)
    cfg = tiny_config(tmp_path, f"method.name={name}", *HEADS[name], "model.width=8", "train.precision=bf16")
    trainer = assert_a_non_finite_batch_changes_nothing(cfg, name)
    assert trainer.amp is torch.bfloat16


def assert_a_non_finite_batch_changes_nothing(cfg, name: str) -> Trainer:
    """A clean step, a non-finite one, a clean one against the same without the bad step."""
    first, bad, second = batches(name)
    skipped, loss, states = run_steps(cfg, [first, bad, second])
    never, expected, _ = run_steps(cfg, [first, None, second])
    assert int(skipped.bad.total) == 1 and int(never.bad.total) == 0
    # the bad step itself: queue, EMA targets, BatchNorm statistics, codebook all as they were
    assert_same_tensors(states[0], states[1], "state across the bad step", skip=PROGRESS_DRIVEN)
    assert torch.isfinite(loss) and torch.equal(loss, expected)
    assert_same_tensors(skipped.objective.state_dict(), never.objective.state_dict(), "state")
    assert_same_tensors(skipped.optimizer.state_dict()["state"], never.optimizer.state_dict()["state"], "optimiser")
    return skipped


@pytest.mark.parametrize(
    "name,optimiser", [("moco_v2", "sgd"), ("simsiam", "sgd"), ("byol", "lars"), ("moco_v3", "adamw")]
)
def test_a_non_finite_first_step_changes_nothing(tmp_path, name, optimiser):
    """The first step after start rejected (fused SGD once left its momentum buffers uninitialised then),
    then an accepted one: the same weights, state and optimiser as a run that never took the bad step."""
    cfg = tiny_config(tmp_path, f"method.name={name}", *HEADS[name], "model.width=8", f"optim.name={optimiser}")
    first, bad, _ = batches(name)
    skipped, loss, _ = run_steps(cfg, [bad, first])
    never, expected, _ = run_steps(cfg, [None, first])
    assert int(skipped.bad.total) == 1 and torch.isfinite(loss) and torch.equal(loss, expected)
    assert_same_tensors(skipped.objective.state_dict(), never.objective.state_dict(), "state")
    assert_same_tensors(skipped.optimizer.state_dict()["state"], never.optimizer.state_dict()["state"], "optimiser")
