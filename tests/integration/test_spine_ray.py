"""The spine end to end under real Ray Train: 2 CPU workers (gloo), tiny shards, checkpoint, eval, resume."""

import json

import pytest

from selfsup.config import parse_config
from selfsup.core.checkpoint import latest_checkpoint, load_checkpoint
from tests.helpers import write_tiny_shards

pytestmark = pytest.mark.integration


def tiny_config(tmp_path, train, test, epochs):
    return parse_config(
        {
            "name": "spine",
            "run_root": str(tmp_path / "runs"),
            "seed": 1,
            "data": {"train": str(train), "test": str(test), "batch_size": 16, "loader_workers": 1},
            "model": {"backbone": "resnet18", "width": 4},
            "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_dim": 16},
            "optim": {"epochs": epochs, "warmup_epochs": 0.5, "lr": 0.1},
            "train": {"log_every_steps": 2, "checkpoint_every_steps": 3, "threads": 1},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "eval": {"knn": [[5, 0.07], [20, 0.1]]},
        }
    )


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from selfsup.cluster.ray_driver import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_two_worker_run_checkpoints_evaluates_resumes_and_tracks(tmp_path, ray_local):
    from selfsup.cluster.driver import pretrain
    from selfsup.eval.run import evaluate

    train = write_tiny_shards(tmp_path / "train", [48, 40, 40])  # 128 samples: 4 steps/epoch per rank
    test = write_tiny_shards(tmp_path / "test", [40], seed=1, split="test")
    cfg = tiny_config(tmp_path, train, test, epochs=1)
    summary = pretrain(cfg)
    assert summary["steps"] == summary["total_steps"] == 4
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt.name == "samples-000000000128" and summary["checkpoint"] == str(ckpt)  # 4 steps x 2 ranks x 16
    saved_cfg, weights, state = load_checkpoint(ckpt, with_state=True)
    assert saved_cfg.name == "spine" and state.step == 4 and state.epoch == 1 and len(state.rng) == 2
    # Ray's checkpoint storage is the run folder: it keeps the 2 written last (keep_checkpoints: 2), nothing else
    assert [p.name for p in sorted((cfg.run_dir / "checkpoints").iterdir())] == [
        "samples-000000000096",
        "samples-000000000128",
    ]

    report = evaluate(ckpt, str(train), str(test), tmp_path / "report")
    assert set(report["encoders"]) == {"checkpoint", "pixels", "random_init"}
    for scores in report["encoders"].values():
        assert set(scores) >= {"knn@5", "knn@20", "linear"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert report["encoders"]["pixels"]["knn@5"] > 0.6  # the 4 classes are easy in pixel space
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["encoders"] == report["encoders"]
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "confusion.png").is_file()

    # re-running the same name with a longer plan resumes at step 4 instead of starting over
    longer = tiny_config(tmp_path, train, test, epochs=2)
    summary = pretrain(longer)
    assert summary["steps"] == 8
    logged = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[: logged.index(4) + 1] == [2, 4] and min(logged[logged.index(4) + 1 :]) > 4

    # W&B ran offline under the run folder, one run id for both attempts, holding the logged loss
    runs = sorted((cfg.run_dir / "wandb").glob("offline-run-*"))
    run_id = (cfg.run_dir / "wandb_id").read_text().strip()
    assert runs and all(r.name.endswith(run_id) for r in runs)
    assert any(b"train/loss" in f.read_bytes() for r in runs for f in r.glob("*.wandb"))
