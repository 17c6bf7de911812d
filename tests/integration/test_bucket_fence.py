"""The lease and its fence on a bucket (moto S3): a silent holder is taken over by its counter, and its
later checkpoint push, prune and metrics push are refused, the bucket left as its new driver wrote it."""

from __future__ import annotations

import json

import boto3
import pytest
import torch

from selfsup.config import parse_config
from selfsup.train.lease import LEASE, LeaseLost, RunLease
from tests.clusterkit import s3_server
from tests.helpers import save_at

pytestmark = pytest.mark.integration
BUCKET = "selfsup-fence"


def _objects(prefix: str) -> dict[str, str]:
    """Key -> ETag under ``prefix``, but the lease (its holder's heartbeat rewrites it)."""
    found = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix) :]: o["ETag"] for o in found if not o["Key"].endswith(LEASE)}


def _holder(key: str) -> str | None:
    """The token of the lease at ``key``, None when there is none."""
    client = boto3.client("s3")
    try:
        return json.loads(client.get_object(Bucket=BUCKET, Key=f"{key}/{LEASE}")["Body"].read())["token"]
    except client.exceptions.NoSuchKey:
        return None


def test_a_taken_lease_on_a_bucket_refuses_the_old_drivers_pushes(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    with s3_server(BUCKET):
        url = f"s3://{BUCKET}/runs/x"
        cfg = parse_config(
            {"name": "x", "run_root": f"s3://{BUCKET}/runs", "data": {"train": "x"}, "method": {"name": "simclr"}}
        )
        old = RunLease(url, host="host-a", heartbeat_every=3600)  # paused: its counter stands still
        old.acquire()
        save_at(cfg.run_dir, cfg, 1, {"w": torch.zeros(4)}, keep=1, fence=old.fence)
        new = RunLease(url, host="host-b", stale_after=0.5, heartbeat_every=0.1)
        new.acquire()  # another host's silent lease: taken over
        save_at(cfg.run_dir, cfg, 2, {"w": torch.ones(4)}, keep=1, fence=new.fence)
        before = _objects("runs/x/")
        assert _holder("runs/x") == new.record["token"] and "checkpoints/samples-000000000016/progress.json" in before
        assert "checkpoints/samples-000000000008/progress.json" not in before  # pruned by the new driver
        (cfg.run_dir / "metrics.jsonl").write_text('{"step": 3}\n')
        with pytest.raises(LeaseLost, match=f"the lease of {url} was taken over by pid .* on host-b"):
            save_at(cfg.run_dir, cfg, 3, {"w": torch.full((4,), 2.0)}, keep=1, fence=old.fence)
        assert _objects("runs/x/") == before  # no push, no prune, no metrics: the bucket is the new driver's
        old.release()
        assert _holder("runs/x") == new.record["token"]  # the old driver's exit leaves the new lease
        new.release()
        assert _holder("runs/x") is None
