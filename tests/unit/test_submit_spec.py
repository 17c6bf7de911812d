"""What `selfsup submit` sends: secrets only in the job metadata (never env_vars, which Ray logs), a resolved
config, a local dashboard by default."""

from __future__ import annotations

import json

import pytest
import yaml

from selfsup.cluster import submit as sub
from selfsup.cluster.secrets import job_secrets
from tests.helpers import tiny_config, write_config


def test_secrets_go_only_to_the_job_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-123")
    monkeypatch.setenv("HF_TOKEN", "hf-secret-456")
    cfg = write_config(tmp_path / "c.yaml", tiny_config("job", "shards", "runs"))
    staging = tmp_path / "staging"
    staging.mkdir()
    spec = sub.job_spec(str(cfg), ["optim.epochs=3"], staging, ["HF_TOKEN"])
    assert spec["metadata"]["secret:WANDB_API_KEY"] == "wandb-secret-123"
    assert spec["metadata"]["secret:HF_TOKEN"] == "hf-secret-456"
    shipped = (staging / "config.yaml").read_text()
    for secret in ("wandb-secret-123", "hf-secret-456"):
        assert secret not in spec["entrypoint"] and secret not in shipped and secret not in str(spec["runtime_env"])
    # the job's driver reads them back from the job config Ray gives it
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": spec["metadata"]}))
    assert job_secrets() == {"WANDB_API_KEY": "wandb-secret-123", "HF_TOKEN": "hf-secret-456"}
    resolved = yaml.safe_load(shipped)
    assert resolved["optim"]["epochs"] == 3  # overrides applied before shipping
    assert resolved["run_root"] == str((tmp_path.cwd() / "runs").resolve())  # local paths made absolute
    assert spec["entrypoint"] == "python -m selfsup.cli pretrain config.yaml"
    assert spec["runtime_env"]["working_dir"] == str(staging)


def test_a_missing_env_name_and_a_bad_config_fail_before_submitting(tmp_path, monkeypatch):
    from selfsup.config import ConfigError

    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_config("job", "shards", "runs"))
    with pytest.raises(sub.SubmitError, match="--env NOPE_NOT_SET: not set"):
        sub.job_spec(str(cfg), [], tmp_path, ["NOPE_NOT_SET"])
    with pytest.raises(ConfigError, match="optim.epochs"):
        sub.job_spec(str(cfg), ["optim.epochs=-1"], tmp_path)


def test_redact_hides_secret_values():
    assert sub.redact("key=abcd1234 ok", {"K": "abcd1234"}) == "key=*** ok"


class Context:
    """What ray.init returns, as far as init_ray reads it."""

    def __init__(self, dashboard_url: str | None):
        self.dashboard_url = dashboard_url


def test_local_ray_binds_the_dashboard_to_localhost(monkeypatch, caplog):
    import ray

    from selfsup.cluster.ray_driver import init_ray

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw) or Context("127.0.0.1:8265"))
    with caplog.at_level("INFO", logger="selfsup.cluster"):
        init_ray()
    assert seen["dashboard_host"] == "127.0.0.1" and seen["address"] == "local"  # never another program's Ray
    assert caplog.text.count("Ray dashboard: http://127.0.0.1:8265") == 1


@pytest.mark.parametrize(
    "given, env, joined",
    [
        ("auto", None, "auto"),
        (None, "10.0.0.1:6379", "10.0.0.1:6379"),
        ("ray://head:10001", "10.0.0.1:6379", "ray://head:10001"),
    ],
)
def test_an_address_or_ray_address_joins_that_cluster(monkeypatch, given, env, joined):
    import ray

    from selfsup.cluster.ray_driver import init_ray

    seen = {}
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw) or Context(None))
    init_ray(given)
    assert seen["address"] == joined and "num_cpus" not in seen  # joins; starts nothing of its own
