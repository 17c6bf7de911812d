"""The cluster templates load, carry the fields Ray / KubeRay need, keep token auth on and name a valid experiment."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

import selfsup
from selfsup.config import parse_config

TEMPLATES = Path(selfsup.__file__).parent / "cluster" / "templates"


@pytest.mark.parametrize("name,provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_cluster_launcher_templates(name, provider):
    t = yaml.safe_load((TEMPLATES / name).read_text())
    assert {
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "max_workers",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "setup_commands",
    } <= t.keys()
    assert t["provider"]["type"] == provider and t["head_node_type"] in t["available_node_types"]
    workers = [v for k, v in t["available_node_types"].items() if k != t["head_node_type"]]
    gpu_key = "InstanceType" if provider == "aws" else "machineType"
    assert workers and all(w["max_workers"] >= w["min_workers"] >= 0 and gpu_key in w["node_config"] for w in workers)
    assert sum(w["max_workers"] for w in workers) >= t["max_workers"]
    head = " ".join(t["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    for cmds in (t["head_start_ray_commands"], t["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds) and "RAY_LOGGER_LEVEL=warning" in " ".join(cmds)
    assert "~/.ray/auth_token" in t["file_mounts"]  # every node gets the cluster token


def test_kuberay_rayjob_template_runs_a_valid_experiment_on_object_storage():
    job, config_map = yaml.safe_load_all((TEMPLATES / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name", "image"} <= head.keys() and cluster["workerGroupSpecs"]
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    env = {e["name"]: e for e in head["env"]}
    assert "secretKeyRef" in env["WANDB_API_KEY"]["valueFrom"] and env["RAY_LOGGER_LEVEL"]["value"] == "warning"

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["selfsup", "pretrain"] and argv[2] == "/config/experiment.yaml"
    experiment = yaml.safe_load(config_map["data"]["experiment.yaml"])
    cfg = parse_config(experiment, argv[3:], "kuberay-rayjob.yaml")
    assert cfg.data.train.startswith("s3://") and cfg.run_url and cfg.scaling.use_gpu
    assert cfg.scaling.max_failures > 0
