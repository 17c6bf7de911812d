"""Pre-flight: what the run asks of Ray (workers, CPUs each, a GPU each) is compared with what the
cluster can offer, and a run it can never place is refused in one line instead of waiting forever;
without Ray, ``scaling.use_gpu`` without a visible GPU is refused too."""

from __future__ import annotations

import time

import pytest

from selfsup import cli
from selfsup.cluster.ray_driver import unmet_resources
from selfsup.config import ScalingConfig
from tests.helpers import tiny_config, write_config, write_tiny_shards


@pytest.mark.parametrize(
    "asked, cluster, said",
    [
        (
            {"use_gpu": True},
            {"CPU": 16.0},
            "scaling.use_gpu=true but the Ray cluster has no GPU: set "
            "scaling.use_gpu=false or submit to a cluster with GPUs",
        ),
        (
            {"use_gpu": True, "num_workers": 4},
            {"CPU": 64.0, "GPU": 2.0},
            "scaling.num_workers=4 with scaling.use_gpu=true needs 4 GPUs (one a worker) but the Ray cluster has 2: "
            "set scaling.num_workers=2",
        ),
        (
            {"use_gpu": True, "num_workers": (3, 8)},
            {"CPU": 64.0, "GPU": 2.0},
            "scaling.num_workers=[3, 8] with scaling.use_gpu=true needs 3 GPUs",
        ),
        (
            {"num_workers": 2, "cpus_per_worker": 4},
            {"CPU": 6.0},
            "scaling.num_workers=2 x scaling.cpus_per_worker=4 needs 8 CPUs but the Ray cluster has 6: "
            "set scaling.num_workers=1 or lower scaling.cpus_per_worker",
        ),
        (
            {"cpus_per_worker": 4},
            {"CPU": 2.0},
            "scaling.cpus_per_worker=4 but the Ray cluster has 2 CPUs: set scaling.cpus_per_worker=2 or less",
        ),
    ],
)
def test_what_the_cluster_cannot_place_is_named_with_what_to_change(asked, cluster, said):
    assert unmet_resources(ScalingConfig(**asked), cluster).startswith(said)


@pytest.mark.parametrize(
    "asked, cluster",
    [
        ({}, {"CPU": 1.0}),
        ({"use_gpu": True, "num_workers": (2, 8), "cpus_per_worker": 4}, {"CPU": 8.0, "GPU": 2.0}),  # elastic: its min
    ],
)
def test_what_fits_passes(asked, cluster):
    assert unmet_resources(ScalingConfig(**asked), cluster) is None


@pytest.fixture
def run_config(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [16])  # data that passes: the checks here come after it
    return write_config(tmp_path / "x.yaml", tiny_config("x", shards, tmp_path / "runs"))


def test_no_ray_with_use_gpu_and_no_gpu_is_refused_in_one_line(run_config, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["pretrain", str(run_config), "--no-ray", "scaling.use_gpu=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: scaling.use_gpu=true but torch sees no CUDA GPU here")
    assert err.count("\n") == 1
    assert "set scaling.use_gpu=false" in err and not (tmp_path / "runs" / "x" / "checkpoints").exists()


@pytest.fixture
def ray_of_two_cpus():
    import ray

    from selfsup.cluster.ray_driver import init_ray

    started = time.perf_counter()
    init_ray(num_cpus=2)
    print(f"Ray started in {time.perf_counter() - started:.1f} s")
    yield ray
    ray.shutdown()


def test_a_real_ray_refuses_a_run_it_cannot_place_within_10_s(run_config, ray_of_two_cpus, capsys, monkeypatch):
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch.TorchTrainer, "fit", lambda self: pytest.fail("waited on Ray's scheduling"))
    gpus = int(ray_of_two_cpus.cluster_resources().get("GPU", 0))
    asked, said = (
        (["scaling.use_gpu=true"], "scaling.use_gpu=true but the Ray cluster has no GPU")
        if not gpus
        else ([f"scaling.num_workers={gpus + 1}", "scaling.use_gpu=true"], f"needs {gpus + 1} GPUs")
    )
    started = time.perf_counter()
    assert cli.main(["pretrain", str(run_config), *asked]) == 2
    took = time.perf_counter() - started
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"refused {took:.1f} s after Ray was up")
    assert said in err and err.count("\n") == 1
    assert took < 10  # the bound: no waiting on Ray's scheduler
