"""Helpers for the cluster-operations tests: free ports, a local S3 server, a Ray head (the tiny config is
``tests.helpers.tiny_config``)."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from unittest import mock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(bucket: str = "selfsup-test"):
    """A moto S3 server on 127.0.0.1 with ``bucket``; yields the env a client needs to reach it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        with mock.patch.dict(os.environ, env):
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield env
    finally:
        server.stop()


def upload_dir(local: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3")
    for f in sorted(Path(local).iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


@contextmanager
def ray_head(env: dict, num_cpus: int = 2, temp_dir: Path | None = None):
    """``ray start --head --block`` on 127.0.0.1 with free ports and its own temp dir (``temp_dir``, else a
    new one); yields (dashboard URL, GCS address, temp dir). Stopped by signalling that process only (never
    ``ray stop``, which would stop every Ray on the machine)."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.error
    import urllib.request

    # short: Ray's socket paths must stay under 107 bytes
    temp = str(temp_dir) if temp_dir is not None else tempfile.mkdtemp(prefix="ray", dir="/tmp")
    gcs, dash = free_port(), free_port()
    ports = {
        f"--{name}": free_port()
        for name in (
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    }
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # up, and asking for the token
                break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError("the Ray dashboard did not come up in 120 s")
        yield url, f"127.0.0.1:{gcs}", Path(temp)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
