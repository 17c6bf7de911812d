"""Online monitoring in the training loop: kNN@20 + RankMe on held-out shards, logged every N epochs."""

from __future__ import annotations

import json

import pytest
import torch

from selfsup.core.checkpoint import latest_checkpoint, load_checkpoint
from selfsup.eval.features import encoder_from_checkpoint
from selfsup.eval.knn import weighted_knn
from selfsup.eval.online import OnlineMonitor
from selfsup.tasks.vision import VisionTask, extract_features, views_for
from tests.helpers import fit, tiny_experiment, write_tiny_shards


def config(tmp_path, *overrides):
    train = write_tiny_shards(tmp_path / "train", [40, 40])
    test = write_tiny_shards(tmp_path / "test", [30], seed=1, split="test")
    return tiny_experiment(
        "mon",
        train,
        tmp_path / "runs",
        *overrides,
        data={"test": str(test), "batch_size": 16, "shuffle_buffer": 0},
        method={"proj_hidden_dim": 16, "proj_dim": 8},
        optim={"warmup_epochs": 0, "epochs": 2},
        train={"precision": "fp32", "log_every_steps": 100, "checkpoint_every_steps": 1000, "monitor_every_epochs": 1},
    )


def test_loop_logs_monitor_every_epoch_and_it_matches_an_offline_knn(tmp_path):
    cfg = config(tmp_path)
    fit(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in records if "monitor/knn@20" in r]
    assert [r["step"] for r in monitored] == [5, 10]  # 80 samples / batch 16 = 5 steps per epoch
    for r in monitored:
        assert r["monitor/seconds"] > 0 and 0 < r["monitor/fraction"] < 1
        assert 1 <= r["monitor/rankme"] <= 32  # at most the feature dimension (ResNet-18 width 4: 32)
    assert 0 < monitored[0]["train_seconds"] < monitored[1]["train_seconds"]  # a curve against wall time
    # the last monitor saw the final weights: the same kNN computed offline from the checkpoint agrees
    ckpt_cfg, state, _ = load_checkpoint(latest_checkpoint(cfg.run_dir))
    encoder = encoder_from_checkpoint(ckpt_cfg, state)
    bank_split = VisionTask().read_labelled(cfg.data.train, ckpt_cfg)
    query_split = VisionTask().read_labelled(cfg.data.test, ckpt_cfg)
    bank = extract_features(encoder, bank_split.inputs, views_for(ckpt_cfg))
    queries = extract_features(encoder, query_split.inputs, views_for(ckpt_cfg))
    knn = weighted_knn(bank, bank_split.labels, queries, query_split.labels, settings=[(20, 0.07)], num_classes=4)
    assert monitored[-1]["monitor/knn@20"] == pytest.approx(knn.top1["knn@20"])


def test_monitor_reads_a_spread_subset_once_and_keeps_the_mode(tmp_path):
    cfg = config(tmp_path)
    monitor = OnlineMonitor(cfg, bank_size=20, query_size=7)
    encoder = encoder_from_checkpoint(cfg, None).train()
    first = monitor(encoder)
    assert encoder.training
    bank, queries = monitor.data
    assert len(bank.inputs) == 20 and len(queries.inputs) == 7
    all_x = VisionTask().read_labelled(cfg.data.train, cfg).inputs
    assert torch.equal(bank.inputs[10:], all_x[40:50])  # 10 from each of the 2 shards, not 20 from the first
    data = monitor.data
    second = monitor(encoder)
    assert monitor.data is data and second["monitor/knn@20"] == first["monitor/knn@20"]
    assert monitor.due(2) and OnlineMonitor(config(tmp_path / "b", "train.monitor_every_epochs=3")).due(2) is False


def test_monitor_needs_test_shards(tmp_path):
    with pytest.raises(ValueError, match="set data.test, or train.monitor_every_epochs=0"):
        config(tmp_path, "data.test=null")  # refused with the config, before any training


def test_the_monitor_scores_random_init_and_pixels_on_its_own_subset(tmp_path):
    cfg = config(tmp_path)
    monitor = OnlineMonitor(cfg, bank_size=40, query_size=30)
    torch.manual_seed(cfg.seed)  # the loop's starting weights: what the random-init level is measured on
    start = encoder_from_checkpoint(cfg, None)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    record = monitor(start)
    assert torch.equal(torch.get_rng_state(), before)  # the loop's RNG stream is untouched
    assert record["monitor/random_init_knn@20"] == pytest.approx(record["monitor/knn@20"])
    bank, queries = monitor.data
    flat = lambda x: x.reshape(len(x), -1).float().div(255).numpy()  # noqa: E731
    pixels = weighted_knn(
        flat(bank.inputs), bank.labels, flat(queries.inputs), queries.labels, settings=[(20, 0.07)], num_classes=4
    )
    assert record["monitor/pixels_knn@20"] == pytest.approx(pixels.top1["knn@20"])
    assert record["monitor/collapse"] == 0.0


@pytest.mark.parametrize(
    "history, warned",
    [
        ([(0.8, 40.0), (0.7, 30.0), (0.6, 5.0), (0.5, 1.9)], True),  # 3 falls, RankMe 1.9 < 5% of 40
        ([(0.8, 40.0), (0.7, 30.0), (0.6, 5.0), (0.5, 2.1)], False),  # RankMe still above 5% of its peak
        ([(0.8, 40.0), (0.7, 30.0), (0.75, 5.0), (0.5, 1.0)], False),  # kNN rose once in between
        ([(0.7, 40.0), (0.6, 5.0), (0.5, 1.0)], False),  # only 2 falls
    ],
)
def test_a_collapse_warning_needs_three_kNN_falls_and_RankMe_under_5_percent_of_its_peak(
    tmp_path, caplog, history, warned
):
    monitor = OnlineMonitor(config(tmp_path))
    monitor.history = list(history)
    with caplog.at_level("WARNING", logger="selfsup.monitor"):
        assert monitor._collapsing() is warned
    assert ("fell 3 checks in a row (80.0% -> 70.0% -> 60.0% -> 50.0%) and RankMe is 1.9" in caplog.text) is (
        warned and history[-1][1] == 1.9
    )
