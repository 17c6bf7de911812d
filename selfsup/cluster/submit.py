"""``selfsup submit`` and ``selfsup jobs``: Ray's Job Submission SDK around ``selfsup pretrain``.

The config is validated here, resolved (overrides applied, local paths made absolute) and shipped
as the job's ``working_dir``; the ``selfsup`` package travels in ``py_modules``, so the cluster runs
this code. Secrets (``WANDB_API_KEY`` and the variables named by ``--env``) travel in the job's
metadata, never in its ``env_vars`` (Ray's runtime-env agent writes a job's ``env_vars`` into its
logs, mode 644), on the command line, in the shipped config or in what this command prints. The
job's driver reads them back (``selfsup.cluster.secrets.job_secrets``) and hands them to the training workers in memory.
Anyone holding the cluster token can read a job's metadata through the dashboard, as they can
submit jobs. Token authentication: set ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (or
``~/.ray/auth_token``) in this environment; Ray's SDK sends it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from selfsup.cluster.secrets import SECRET_PREFIX
from selfsup.config import dump_config, load_config
from selfsup.errors import OneLineError

SECRET_ENV = ("WANDB_API_KEY",)
EXIT_CODES = {"SUCCEEDED": 0, "STOPPED": 3}  # anything else (FAILED) is 1


class SubmitError(OneLineError, RuntimeError):
    """The job could not be submitted or queried; the message says what to do."""


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, auth failures, bad address
        where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "(none given)"
        raise SubmitError(
            f"cannot reach the Ray dashboard at {where}: {str(err).splitlines()[0]}\n"
            "  pass --address http://HEAD:8265 (port-forward it if needed); with token auth set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
        ) from None


def secret_env(names: list[str]) -> dict[str, str]:
    """The variables a job needs but must not see on its command line: WANDB_API_KEY (when set) and ``names``."""
    env = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise SubmitError(f"--env {' '.join(missing)}: not set in this environment; export it first")
    env.update({n: os.environ[n] for n in names})
    return env


def redact(text: str, secrets: dict[str, str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for value in secrets.values():
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def job_spec(config: str, overrides: list[str], staging: Path, env_names: Sequence[str] = ()) -> dict:
    """The keyword arguments of ``submit_job``: entrypoint, runtime_env (working_dir, py_modules, env_vars),
    metadata (the run, and the secrets under ``secret:NAME``)."""
    from selfsup.cluster.ray_driver import absolute_paths

    cfg = absolute_paths(load_config(config, overrides))
    (staging / "config.yaml").write_text(dump_config(cfg))
    package = Path(__file__).resolve().parents[1]
    return {
        "entrypoint": "python -m selfsup.cli pretrain config.yaml",
        "runtime_env": {
            "working_dir": str(staging),
            "py_modules": [str(package)],
            "env_vars": {"RAY_TRAIN_V2_ENABLED": "1"},
        },
        "metadata": {
            "selfsup_run": cfg.name,
            "run_dir": cfg.run_url or str(cfg.run_dir),
            **{SECRET_PREFIX + k: v for k, v in secret_env(list(env_names)).items()},
        },
    }


async def _follow(client, job_id: str, secrets: dict[str, str]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(redact(chunk, secrets))
        sys.stdout.flush()


def wait_for(client, job_id: str, secrets: dict[str, str] | None = None) -> str:
    """Print the job's logs until it ends; its final status."""
    asyncio.run(_follow(client, job_id, secrets or {}))
    return str(client.get_job_status(job_id).value)


def submit(
    config: str, overrides: list[str], address: str | None, wait: bool = True, env_names: Sequence[str] = ()
) -> int:
    """Submit ``selfsup pretrain config overrides``; 0 when it succeeded (or was only submitted)."""
    with tempfile.TemporaryDirectory(prefix="selfsup-job-") as staging:
        spec = job_spec(config, overrides, Path(staging), env_names)
        client = _client(address)
        job_id = client.submit_job(**spec)
    print(f"submitted job {job_id} (run {spec['metadata']['selfsup_run']} -> {spec['metadata']['run_dir']})")
    if not wait:
        print(f"follow it with: selfsup jobs logs {job_id} --address {address or '$RAY_ADDRESS'}")
        return 0
    secrets = {k: v for k, v in spec["metadata"].items() if k.startswith(SECRET_PREFIX)}
    status = wait_for(client, job_id, secrets)
    print(f"job {job_id}: {status}")
    return EXIT_CODES.get(status, 1)


def jobs(action: str, job_id: str, address: str | None) -> int:
    """``status``, ``logs`` or ``stop`` one job."""
    client = _client(address)
    try:
        if action == "status":
            info = client.get_job_info(job_id)
            print(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
            return EXIT_CODES.get(str(info.status.value), 1) if info.status.is_terminal() else 0
        if action == "logs":
            print(client.get_job_logs(job_id), end="")
            return 0
        stopped = client.stop_job(job_id)
        print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    except RuntimeError as err:  # the SDK's "job does not exist" and HTTP errors
        raise SubmitError(f"job {job_id}: {str(err).splitlines()[0]}") from None
