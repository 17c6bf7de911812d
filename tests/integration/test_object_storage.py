"""Shards read from, and checkpoints + run state written to, a real S3-protocol server (moto) on 127.0.0.1."""

from __future__ import annotations

import json

import boto3
import pytest
import torch

from selfsup.cluster.trainer import pretrain_here
from selfsup.config import parse_config
from selfsup.core import storage
from selfsup.core.checkpoint import load_checkpoint
from selfsup.data.reader import read_manifest, read_shard
from tests.clusterkit import s3_server, tiny_config, upload_dir
from tests.conftest import write_tiny_shards

pytestmark = pytest.mark.integration
BUCKET = "selfsup-test"


def _keys(prefix: str) -> list[str]:
    found = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix):] for o in found)


def test_shards_and_checkpoints_on_s3_resume_on_another_node(tmp_path, monkeypatch):
    local = write_tiny_shards(tmp_path / "shards", [20, 30, 14])
    with s3_server(BUCKET):
        upload_dir(local, BUCKET, "data/train")
        manifest, urls = read_manifest(f"s3://{BUCKET}/data/train")
        assert urls[0] == f"s3://{BUCKET}/data/train/train0-000000.tar"
        problems = []
        assert [sum(1 for _ in read_shard(u, problems, s["count"], sha256=s["sha256"]))
                for u, s in zip(urls, manifest["shards"])] == [20, 30, 14]
        assert problems == []  # the sha256 hashed as the bytes stream from S3

        tree = tiny_config("s3run", f"s3://{BUCKET}/data/train", f"s3://{BUCKET}/runs",
                           optim={"epochs": 1}, train={"keep_checkpoints": 2})
        monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "node-a"))
        cfg = parse_config(tree)
        first = pretrain_here(cfg)
        assert first["steps"] == 8  # 64 samples // 8
        assert cfg.run_dir.is_relative_to(tmp_path / "node-a")
        keys = _keys("runs/s3run/")
        # every checkpoint pushed carries its marker; only the newest 2 are kept; metrics and summary pushed
        assert [k for k in keys if k.endswith(storage.MARKER)] == [
            "checkpoints/step-00000004/COMPLETE", "checkpoints/step-00000008/COMPLETE"]
        assert {"metrics.jsonl", "summary.json", "checkpoints/step-00000008/model.pt",
                "checkpoints/step-00000008/state.pt", "checkpoints/step-00000008/config.yaml"} <= set(keys)
        assert json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key="runs/s3run/summary.json")["Body"]
                          .read())["steps"] == 8

        # a checkpoint without its marker (a push cut short) is never taken
        boto3.client("s3").put_object(Bucket=BUCKET, Key="runs/s3run/checkpoints/step-00000099/model.pt", Body=b"x")
        assert storage.remote_checkpoints(cfg.run_url) == ["step-00000004", "step-00000008"]

        # another node (empty cache) continues the same run for a second epoch from the bucket
        monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "node-b"))
        cfg2 = parse_config(tree, ["optim.epochs=2"])
        second = pretrain_here(cfg2)
        assert second["steps"] == 16
        records = [json.loads(x) for x in (cfg2.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 17))  # pulled metrics, then steps 9..16 only
        _, weights, state = load_checkpoint(cfg2.run_dir / "checkpoints" / "step-00000016", with_state=True)
        assert state["step"] == 16 and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
        assert storage.remote_checkpoints(cfg2.run_url) == ["step-00000012", "step-00000016"]


def test_a_missing_remote_manifest_names_the_location(tmp_path):
    from selfsup.data.reader import ManifestError

    with s3_server(BUCKET):
        with pytest.raises(ManifestError, match=f"s3://{BUCKET}/nothing has no manifest.json"):
            read_manifest(f"s3://{BUCKET}/nothing")
