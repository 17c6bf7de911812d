"""The collapse alarm on synthetic sequences of logged statistics."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from selfsup.core.collapse import CollapseMonitor, embedding_stats, rankme

D = 64
HEALTHY = 1 / math.sqrt(D)


def test_healthy_run_raises_no_alarm():
    mon = CollapseMonitor(D)
    alarms = [mon.update(s, {"embed_std": HEALTHY * (1 - 0.01 * s), "rankme": 50.0 - s}) for s in range(20)]
    assert alarms == [[]] * 20


def test_std_collapse_warns_once_until_recovery(caplog):
    mon = CollapseMonitor(D)
    stds = [HEALTHY, HEALTHY / 2, HEALTHY / 20, HEALTHY / 50, HEALTHY, HEALTHY / 30]
    with caplog.at_level(logging.WARNING, logger="selfsup.collapse"):
        fired = [len(mon.update(s, {"embed_std": v})) for s, v in enumerate(stds)]
    assert fired == [0, 0, 1, 0, 0, 1]  # below 0.1/sqrt(D) at steps 2 and 5; step 3 is the same episode
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2
    assert caplog.records[0].getMessage().startswith("representation collapse: embed_std")
    assert "step 2" in caplog.records[0].getMessage()


def test_rankme_alarm_is_relative_to_the_peak_so_far():
    mon = CollapseMonitor(D, rank_fraction=0.05)
    assert mon.update(0, {"rankme": 8.0}) == []  # a random network's RankMe starts low ...
    assert mon.update(1, {"rankme": 40.0}) == []  # ... and grows while training
    assert mon.update(2, {"rankme": 2.5}) == []  # 6.25% of the peak: not yet
    (msg,) = mon.update(3, {"rankme": 1.5})
    assert "rankme 1.5 < 2" in msg and "peak 40" in msg


def test_alarm_fires_on_statistics_of_a_really_collapsed_batch():
    g = torch.Generator().manual_seed(0)
    mon = CollapseMonitor(D)
    spread = {k: float(v) for k, v in embedding_stats(torch.randn(256, D, generator=g)).items()}
    collapsed = {
        k: float(v) for k, v in embedding_stats(torch.ones(256, D) + 1e-4 * torch.randn(256, D, generator=g)).items()
    }
    assert mon.update(0, spread) == []
    causes = [m.split(":")[1].split()[0] for m in mon.update(1, collapsed)]
    assert causes == ["embed_std", "rankme"]


def test_embedding_stats_use_the_one_rankme():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 16)
    assert float(embedding_stats(z)["rankme"]) == float(rankme(z))
    assert float(rankme(z.double())) == pytest.approx(float(rankme(z)), rel=1e-6)  # float64 whatever the input
