"""Shards read from, and checkpoints + run state written to, a real S3-protocol server (moto) on 127.0.0.1."""

from __future__ import annotations

import json

import boto3
import pytest
import torch

from selfsup.cluster.driver import pretrain
from selfsup.config import parse_config
from selfsup.core import storage
from selfsup.core.checkpoint import load_checkpoint
from selfsup.data.reader import read_manifest, read_shard
from tests.clusterkit import s3_server, upload_dir
from tests.helpers import tiny_config, write_tiny_shards

pytestmark = pytest.mark.integration
BUCKET = "selfsup-test"


def _keys(prefix: str) -> list[str]:
    found = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix) :] for o in found)


def test_shards_and_checkpoints_on_s3_resume_on_another_node(tmp_path, monkeypatch):
    local = write_tiny_shards(tmp_path / "shards", [20, 30, 14])
    with s3_server(BUCKET):
        upload_dir(local, BUCKET, "data/train")
        manifest, urls = read_manifest(f"s3://{BUCKET}/data/train")
        assert urls[0] == f"s3://{BUCKET}/data/train/train0-000000.tar"
        problems = []
        assert [
            sum(1 for _ in read_shard(u, problems, s["count"], sha256=s["sha256"]))
            for u, s in zip(urls, manifest["shards"])
        ] == [20, 30, 14]
        assert problems == []  # the sha256 hashed as the bytes stream from S3

        tree = tiny_config(
            "s3run",
            f"s3://{BUCKET}/data/train",
            f"s3://{BUCKET}/runs",
            optim={"epochs": 1},
            train={"keep_checkpoints": 2},
        )
        monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "node-a"))
        cfg = parse_config(tree)
        first = pretrain(cfg, use_ray=False)
        assert first["steps"] == 8  # 64 samples // 8
        assert cfg.run_dir.is_relative_to(tmp_path / "node-a")
        keys = _keys("runs/s3run/")
        # every checkpoint pushed carries its progress.json; only the 2 written last are kept; metrics and
        # summary pushed. Names count samples: step 4 and step 8 (the epoch's end) of batch 8 on one rank
        assert [k for k in keys if k.endswith(storage.PROGRESS)] == [
            "checkpoints/samples-000000000032/progress.json",
            "checkpoints/samples-000000000064/progress.json",
        ]
        last = "checkpoints/samples-000000000064"
        assert {"metrics.jsonl", "summary.json", f"{last}/model.pt", f"{last}/state.pt", f"{last}/config.yaml"} <= set(
            keys
        )
        assert (
            json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key="runs/s3run/summary.json")["Body"].read())[
                "steps"
            ]
            == 8
        )
        assert first["checkpoint"] == f"{cfg.run_url}/checkpoints/samples-000000000064"

        # a push cut short (no progress.json, a progress.json listing files not all there at their sizes, or
        # a half-written one) is never taken, even when its name or seq says it is newer
        s3 = boto3.client("s3")
        cut = "runs/s3run/checkpoints/samples-000000000099"
        s3.put_object(Bucket=BUCKET, Key=f"{cut}/model.pt", Body=b"x")
        short = "runs/s3run/checkpoints/samples-000000000100"
        s3.put_object(Bucket=BUCKET, Key=f"{short}/model.pt", Body=b"x")
        s3.put_object(
            Bucket=BUCKET,
            Key=f"{short}/progress.json",
            Body=json.dumps(
                {"seq": 99, "samples_seen": 100, "step": 99, "files": {"model.pt": 1000, "state.pt": 10}}
            ).encode(),
        )
        half = "runs/s3run/checkpoints/samples-000000000101"
        s3.put_object(Bucket=BUCKET, Key=f"{half}/model.pt", Body=b"x")
        s3.put_object(Bucket=BUCKET, Key=f"{half}/progress.json", Body=b'{"seq": 100, "files": {"model.pt"')
        assert storage.remote_checkpoints(cfg.run_url) == ["samples-000000000032", "samples-000000000064"]

        # another node (empty cache) continues the same run for a second epoch from the bucket
        monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "node-b"))
        cfg2 = parse_config(tree, ["optim.epochs=2"])
        second = pretrain(cfg2, use_ray=False)
        assert second["steps"] == 16
        records = [json.loads(x) for x in (cfg2.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 17))  # pulled metrics, then steps 9..16 only
        assert sorted(p.name for p in (cfg2.run_dir / "checkpoints").iterdir()) == [
            "samples-000000000096",
            "samples-000000000128",
        ]  # resumed from 64 (kept 2), none of 99..101 pulled
        _, weights, state = load_checkpoint(cfg2.run_dir / "checkpoints" / "samples-000000000128", with_state=True)
        assert state.step == 16 and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
        assert storage.remote_checkpoints(cfg2.run_url) == ["samples-000000000096", "samples-000000000128"]
        assert second["checkpoint"] == f"{cfg2.run_url}/checkpoints/samples-000000000128"  # the one written last


def test_a_missing_remote_manifest_names_the_location(tmp_path):
    from selfsup.data.reader import ManifestError

    with s3_server(BUCKET), pytest.raises(ManifestError, match=f"s3://{BUCKET}/nothing has no manifest.json"):
        read_manifest(f"s3://{BUCKET}/nothing")
