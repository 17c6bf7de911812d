"""One source of truth for "latest": a Ray run after a --no-ray run of the same name resumes at the run
folder's newest complete checkpoint, though Ray's own snapshot names older (and since pruned) ones,
and deletes none newer."""

from __future__ import annotations

import json

import pytest

from selfsup.cluster.driver import pretrain
from selfsup.cluster.ray_driver import RAY_SNAPSHOT
from selfsup.config import parse_config
from selfsup.core.checkpoint import list_checkpoints
from tests.helpers import tiny_config, write_tiny_shards

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from selfsup.cluster.ray_driver import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _stamps(folder):
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())}


def test_ray_resumes_at_the_runs_newest_checkpoint_not_its_snapshot(tmp_path, ray_local):
    shards = write_tiny_shards(tmp_path / "shards", [32, 32])  # 8 steps of batch 8 an epoch, one worker

    def cfg(epochs: int, keep: int):
        return parse_config(
            tiny_config(
                "mixed",
                shards,
                tmp_path / "runs",
                model={"width": 2},
                method={"name": "simclr", "proj_hidden_dim": 8, "proj_dim": 4},
                optim={"epochs": epochs},
                train={"checkpoint_every_steps": 4, "keep_checkpoints": keep},
                scaling={"num_workers": 1, "cpus_per_worker": 1},
            )
        )

    run = cfg(1, 2).run_dir
    assert pretrain(cfg(1, 2))["steps"] == 8  # Ray: its snapshot lists samples-32 and samples-64
    assert (run / RAY_SNAPSHOT).is_file()
    assert pretrain(cfg(2, 2), use_ray=False)["steps"] == 16  # --no-ray: 96 and 128 written, Ray's two pruned
    newer = [c.name for c in list_checkpoints(run)]
    assert newer == ["samples-000000000096", "samples-000000000128"]
    stamps = {name: _stamps(run / "checkpoints" / name) for name in newer}
    before = (run / "metrics.jsonl").read_text().splitlines()

    summary = pretrain(cfg(3, 10))  # Ray again: resumes at 128 (step 16), not at its snapshot's 64
    assert summary["steps"] == 24 and summary["checkpoint"] == str(run / "checkpoints" / "samples-000000000192")
    assert [c.name for c in list_checkpoints(run)] == [*newer, "samples-000000000160", "samples-000000000192"]
    assert {name: _stamps(run / "checkpoints" / name) for name in newer} == stamps  # untouched, none rewritten
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:16] == before  # steps 1-16 kept as written; 17-24 added once each
    assert [json.loads(line)["step"] for line in after] == list(range(1, 25))
