"""Secrets of a job started by ``selfsup submit``: they travel in the job's metadata, under
``secret:NAME``, never in its ``env_vars`` (which Ray's runtime-env agent writes into its logs)."""

from __future__ import annotations

import json
import os

SECRET_PREFIX = "secret:"


def job_secrets() -> dict[str, str]:
    """Inside a job started by ``selfsup submit``: the secrets its metadata carries (empty elsewhere)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    metadata = job.get("metadata") or {}
    return {k[len(SECRET_PREFIX) :]: v for k, v in metadata.items() if k.startswith(SECRET_PREFIX)}
