"""Nothing lost across nodes: a real multi-node Ray cluster on one machine (issue 17).

A head without CPUs (it holds the driver and Ray Train's controller) and 1-CPU worker nodes, each
its own raylet started by ``ray.cluster_utils.Cluster`` with its own ``SELFSUP_CACHE`` and
``TMPDIR``. The shards and the run root are in a bucket (a moto S3 server on 127.0.0.1), so no node
reads another's local disk. Each scenario loses or adds a node, or kills a worker, at a random step
and checks that the run trains the planned samples; that each restart (a fault or a resize) redid at
most one checkpoint interval (after a resize up, also the part of a step the new world size cannot
express); that ``metrics.jsonl`` in the bucket reads as one run; that the bucket holds just the
checkpoints kept; and that the summary names the checkpoint written last, with the final weights.

``SELFSUP_MULTINODE_REPEATS=3`` runs each scenario three times (default once), each repetition with
its own random steps, from a seed that is printed (``SELFSUP_MULTINODE_SEED`` replays it);
``SELFSUP_MULTINODE_VERBOSE=1`` prints the records as they arrive and keeps Ray's session logs.
Ray's own intervals are shortened for the test (node health checks, the controller's poll, the
elastic resize check, the autoscaling coordinator's refresh of the node list, and the wait for the
resources of a node it still counts after it left); selfsup's behaviour is not changed.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from unittest import mock

import boto3
import pytest
import torch

from tests.clusterkit import free_port, s3_server, upload_dir
from tests.helpers import tiny_config, write_tiny_shards

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

BUCKET = "selfsup-multinode"
REPEATS = int(os.environ.get("SELFSUP_MULTINODE_REPEATS", "1"))
SEED = int(os.environ.get("SELFSUP_MULTINODE_SEED", str(random.SystemRandom().randrange(10**6))))
SAMPLES = 128  # one epoch: 16 steps of batch 8 on 1 worker, 8 on 2
BATCH = 8
INTERVAL = 3  # train.checkpoint_every_steps (odd: a resize meets positions the new size cannot express)
TIMEOUT = 240.0
RAY_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
}  # the wait for resources a stale node list promised


def scenario_rng(name: str, repeat: int) -> random.Random:
    print(f"\n{name} #{repeat}: SELFSUP_MULTINODE_SEED={SEED}")
    return random.Random(f"{SEED}-{name}-{repeat}")


class MultiNode:
    """Raylets on this machine: a head without CPUs and 1-CPU worker nodes, each with its own cache
    and temp folder (``SELFSUP_CACHE``, ``TMPDIR`` in its raylet's environment, so in its workers')."""

    def __init__(self, root: Path):
        from ray.cluster_utils import Cluster

        self.root, self.nodes, self.count = root, {}, 0
        self.temp = f"/tmp/rmn{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
        head = {
            "num_cpus": 0,
            "temp_dir": self.temp,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "env_vars": self.node_env("head"),
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        }
        self.cluster = Cluster(initialize_head=True, head_node_args=head)

    def node_env(self, name: str) -> dict:
        for sub in ("cache", "tmp"):
            (self.root / name / sub).mkdir(parents=True, exist_ok=True)
        return {"SELFSUP_CACHE": str(self.root / name / "cache"), "TMPDIR": str(self.root / name / "tmp")}

    def add(self) -> str:
        """Start a 1-CPU worker node; returns its name."""
        self.count += 1
        name = f"node{self.count}"
        self.nodes[name] = self.cluster.add_node(num_cpus=1, temp_dir=self.temp, env_vars=self.node_env(name))
        return name

    def remove(self, name: str, graceful: bool = False) -> None:
        """Stop node ``name``: SIGKILL every process of it (its raylet, its workers), or SIGTERM first."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=graceful)

    def clear(self) -> None:
        for name in list(self.nodes):
            self.remove(name)

    def metrics(self, name: str, run: str) -> Path:
        """Where rank 0 on node ``name`` keeps the run's records (its local mirror of the bucket's run)."""
        return self.root / name / "cache" / "runs" / "s3" / BUCKET / "runs" / run / "metrics.jsonl"


def fast_autoscaling_coordinator() -> None:
    """Start Ray's autoscaling coordinator (which elastic Ray Train asks what nodes there are) before
    Ray Train does, refreshing its node list every second instead of every 20 s."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:  # Ray's internals: without them the test still runs, each resize waiting up to 20 s longer
        from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

        _ = coordinator._AutoscalingCoordinatorActor.TICK_INTERVAL_S
    except (ImportError, AttributeError) as err:
        print(f"Ray's autoscaling coordinator keeps its own pace: {err}")
        return

    def fast():  # a class made here is shipped by value to the actor
        class FastCoordinator(coordinator._AutoscalingCoordinatorActor):
            TICK_INTERVAL_S = 1

        return FastCoordinator

    actor = (
        ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(fast())
        .options(
            name="AutoscalingCoordinator",
            namespace="AutoscalingCoordinator",
            get_if_exists=True,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        )
        .remote()
    )
    ray.get(actor.cancel_request.remote("none"))


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    env = {**RAY_ENV, "SELFSUP_CACHE": str(root / "driver" / "cache")}  # the driver's own folder
    with mock.patch.dict(os.environ, env), s3_server(BUCKET):
        upload_dir(write_tiny_shards(root / "shards", [40, 56, 32]), BUCKET, "data/train")
        nodes = MultiNode(root)
        try:
            from selfsup.cluster.ray_driver import init_ray

            init_ray(nodes.cluster.address)
            fast_autoscaling_coordinator()
            yield nodes
        finally:
            ray.shutdown()
            nodes.cluster.shutdown()
            if os.environ.get("SELFSUP_MULTINODE_VERBOSE"):
                print(f"Ray's logs: {nodes.temp}/session_latest/logs")
            else:
                shutil.rmtree(nodes.temp, ignore_errors=True)


@pytest.fixture
def cluster(multinode, monkeypatch):
    """The cluster with no worker nodes, and Ray Train checking for a resize every second (not 60 s)."""
    import ray.train

    monkeypatch.setattr(
        ray.train, "ScalingConfig", functools.partial(ray.train.ScalingConfig, elastic_resize_monitor_interval_s=1.0)
    )
    yield multinode
    from ray.util.state import list_actors

    for controller in list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]):
        os.kill(controller.pid, signal.SIGKILL)  # a run a failed test left: it would take the next one's nodes
    multinode.clear()


def config(name: str, epochs: int, num_workers):
    from selfsup.config import parse_config

    return parse_config(
        tiny_config(
            name,
            f"s3://{BUCKET}/data/train",
            f"s3://{BUCKET}/runs",
            model={"width": 8},
            optim={"epochs": epochs},
            train={"checkpoint_every_steps": INTERVAL, "keep_checkpoints": 2, "threads": 1},
            scaling={"num_workers": num_workers, "cpus_per_worker": 1, "max_failures": 8},
        )
    )


class Run:
    """The driver in a thread, followed from outside as an operator would: the records rank 0
    appends to its node's ``metrics.jsonl`` (whichever node that is), in the order they appear."""

    def __init__(self, nodes: MultiNode, cfg):
        from selfsup.cluster.driver import pretrain

        self.nodes, self.name, self.out = nodes, cfg.name, {}
        self.workers_before = len(train_workers(alive=False))
        self.seen: set[str] = set()
        self.samples: list[int] = []  # of each record, in the order they appeared
        self.t0, self.verbose = time.monotonic(), bool(os.environ.get("SELFSUP_MULTINODE_VERBOSE"))

        def go():
            try:
                self.out["summary"] = pretrain(cfg, use_ray=True)
            except BaseException as err:  # noqa: BLE001 - re-raised by finish()
                self.out["error"] = err

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        new = []
        for i in range(1, self.nodes.count + 1):
            path = self.nodes.metrics(f"node{i}", self.name)
            try:
                lines = path.read_text().splitlines() if path.is_file() else []
            except OSError:
                continue
            for line in lines:
                if line.strip() and line not in self.seen:
                    try:
                        new.append(json.loads(line)["samples"])
                    except ValueError:  # being written
                        continue
                    self.seen.add(line)
        self.samples += new
        if new and self.verbose:
            print(f"  {time.monotonic() - self.t0:6.1f}s samples {new}")

    def world(self) -> int:
        """Workers of the latest records (the samples of a step / the batch)."""
        return (self.samples[-1] - self.samples[-2]) // BATCH if len(self.samples) > 1 else 0

    def wait(self, until, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            self.poll()
            if until():
                return
            assert self.thread.is_alive(), f"the run ended before {what}: {self.out}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def finish(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.2)
        assert not self.thread.is_alive(), "the run did not finish"
        self.poll()
        if "error" in self.out:
            raise self.out["error"]
        print(f"  {self.name}: {time.monotonic() - self.t0:.0f} s; records {self.samples}")
        return self.out["summary"]

    def rank0_node(self) -> str:
        """The live node where rank 0 logs (its records file changed last)."""
        live = [
            (self.nodes.metrics(n, self.name).stat().st_mtime, n)
            for n in self.nodes.nodes
            if self.nodes.metrics(n, self.name).is_file()
        ]
        return max(live)[1]

    def restarts(self) -> list[dict]:
        """Each point where a new attempt began, seen in the records: one at or before the record
        logged before it, or a step of another world size. With the samples the interrupted attempt
        had logged, where the new one resumed, and their workers. (An attempt that resumed exactly
        where the one before stopped, on as many workers, leaves no trace here.)"""
        found, s = [], self.samples
        steps = [b - a for a, b in zip(s, s[1:])]  # steps[i - 1]: from record i - 1 to record i
        for i in range(1, len(s)):
            before = steps[i - 2] // BATCH if i > 1 and steps[i - 2] > 0 else 0
            after = steps[i] // BATCH if i < len(steps) else before
            if steps[i - 1] <= 0 or (before and after and steps[i - 1] == after * BATCH != before * BATCH):
                found.append(
                    {"logged": s[i - 1], "resumed": s[i] - after * BATCH, "world": before, "world_after": after}
                )
        return found


def train_workers(alive: bool = True) -> list:
    """The Ray Train worker processes (pid, node_id) alive now, or all that were started."""
    from ray.util.state import list_actors

    found = list_actors(
        filters=[("class_name", "=", "RayTrainWorker")] + [("state", "=", "ALIVE")] * alive, limit=10_000
    )
    return [a for a in found if pid_alive(a.pid)] if alive else found  # not one of a node just stopped


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def bucket_checkpoints(run: str) -> dict[str, dict]:
    """name -> progress.json ({} if it has none) of every checkpoint folder of ``run`` in the bucket."""
    s3 = boto3.client("s3")
    prefix = f"runs/{run}/checkpoints/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    found = {k[len(prefix) :].split("/")[0]: {} for k in keys if k != prefix}  # not the folder marker
    found.update(
        {
            k[len(prefix) :].split("/")[0]: json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())
            for k in keys
            if k.endswith("/progress.json")
        }
    )
    return found


def download(url: str, dest: Path) -> Path:
    s3 = boto3.client("s3")
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        if obj["Key"].endswith("/"):  # a folder marker
            continue
        target = dest / obj["Key"][len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj["Key"], str(target))
    return dest


def check_run(run: Run, summary: dict, tmp: Path, planned: int, world: int, workers: list[int]) -> None:
    """The run trained ``planned`` samples, ending on ``world`` workers; ``summary["checkpoint"]`` is
    in the bucket, was written last and holds the final weights; the bucket's metrics read as one
    run; its attempts had ``workers`` workers each, and each new attempt redid at most one checkpoint
    interval of the one it followed (see ``most_redone``)."""
    from selfsup.core.checkpoint import load_checkpoint

    assert summary["samples_seen"] == planned and summary["steps"] == summary["total_steps"], summary
    found = bucket_checkpoints(run.name)
    name = summary["checkpoint"].rsplit("/", 1)[1]
    assert summary["checkpoint"] == f"s3://{BUCKET}/runs/{run.name}/checkpoints/{name}", summary["checkpoint"]
    assert len(found) == 2, found  # keep_checkpoints: nothing left over by an interrupted attempt
    assert name in found and found[name]["seq"] == max(p.get("seq", 0) for p in found.values()), found
    assert found[name]["samples_seen"] == planned and found[name]["world_size"] == world, found[name]
    written = json.loads(
        boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{run.name}/summary.json")["Body"].read()
    )
    assert written["checkpoint"] == summary["checkpoint"]  # what the loop wrote last is what Ray holds as latest
    saved, weights, state = load_checkpoint(download(summary["checkpoint"], tmp / name), with_state=True)
    assert saved.name == run.name and state.samples_seen == planned and state.step == summary["steps"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{run.name}/metrics.jsonl")["Body"].read()
    samples = [json.loads(line)["samples"] for line in body.decode().splitlines()]
    assert samples[-1] == planned and samples[0] in (BATCH, 2 * BATCH), samples
    assert all(b - a in (BATCH, 2 * BATCH) for a, b in zip(samples, samples[1:])), samples  # a step each

    found = run.restarts()
    for r in found:
        print(
            f"  restart: {r['world']} -> {r['world_after']} workers, logged {r['logged']} samples, "
            f"resumed at {r['resumed']}: redid {r['logged'] - r['resumed']}"
        )
    assert len(train_workers(alive=False)) - run.workers_before == sum(workers), "attempts"
    assert len(found) <= len(workers) - 1, found
    assert all(0 <= r["logged"] - r["resumed"] <= most_redone(r) for r in found), found


def most_redone(restart: dict) -> int:
    """One checkpoint interval of the interrupted attempt; after a resize up, also the batches of a part
    step, which the new world size cannot express (up to one batch fewer than it has workers)."""
    interval = INTERVAL * BATCH * restart["world"]
    return (
        interval + max(0, restart["world_after"] - 1) * BATCH if restart["world_after"] > restart["world"] else interval
    )


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_lost_node_costs_at_most_one_interval(cluster, tmp_path, repeat):
    """2 workers on 3 nodes; the node of rank 0 dies at a random step; Ray starts the group again on
    the two left, which resumes from Ray's latest checkpoint in the bucket."""
    rng = scenario_rng("lost node", repeat)
    kill_at = rng.randint(INTERVAL + 1, 2 * SAMPLES // (2 * BATCH) - 2) * 2 * BATCH  # of 16 steps on 2 workers
    for _ in range(3):
        cluster.add()
    run = Run(cluster, config(f"lost-node-{repeat}", epochs=2, num_workers=2))
    run.wait(lambda: run.samples and run.samples[-1] >= kill_at, f"{kill_at} samples")
    victim = run.rank0_node()
    cluster.remove(victim)
    print(f"  killed {victim} (rank 0) at {kill_at} samples")
    assert not list((cluster.root / "driver" / "cache").rglob("checkpoints"))  # the driver's folder is its own
    check_run(run, run.finish(), tmp_path, planned=2 * SAMPLES, world=2, workers=[2, 2])


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_elastic_one_to_two_when_a_node_joins(cluster, tmp_path, repeat):
    """[1, 2] workers, one node: a second node joins at a random step and Ray resizes to 2; a worker
    killed at a random step after that costs at most one interval, and the run ends on the checkpoint
    written last (by 2 workers), not on a stale one of 1 worker."""
    rng = scenario_rng("1 to 2", repeat)
    join_at = rng.randint(INTERVAL + 1, 12) * BATCH
    cluster.add()
    run = Run(cluster, config(f"grow-{repeat}", epochs=3, num_workers=(1, 2)))
    run.wait(lambda: run.samples and run.samples[-1] >= join_at, f"{join_at} samples")
    cluster.add()
    print(f"  node joined at {run.samples[-1]} samples")
    run.wait(lambda: run.world() == 2, "the resize to 2 workers")
    left = (3 * SAMPLES - run.samples[-1]) // (2 * BATCH)  # steps to go
    assert left >= 3, f"the resize came too late to kill a worker after it: {run.samples}"
    kill_at = run.samples[-1] + rng.randint(1, min(8, left - 2)) * 2 * BATCH
    run.wait(lambda: run.samples[-1] >= kill_at, f"{kill_at} samples")
    victim = rng.choice(train_workers())
    os.kill(victim.pid, signal.SIGKILL)
    print(f"  killed worker {victim.pid} at {run.samples[-1]} samples")
    check_run(run, run.finish(), tmp_path, planned=3 * SAMPLES, world=2, workers=[1, 2, 2])


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_elastic_two_to_one_when_a_node_leaves(cluster, tmp_path, repeat):
    """[1, 2] workers on two nodes: one leaves at a random step and Ray goes on with 1; the worker
    left, killed at a random step after that, costs at most one interval."""
    rng = scenario_rng("2 to 1", repeat)
    leave_at = rng.randint(INTERVAL + 1, 10) * 2 * BATCH
    cluster.add()
    cluster.add()
    run = Run(cluster, config(f"shrink-{repeat}", epochs=2, num_workers=(1, 2)))
    run.wait(lambda: run.world() == 2 and run.samples[-1] >= leave_at, f"{leave_at} samples on 2 workers")
    leaving = rng.choice(sorted(cluster.nodes))
    cluster.remove(leaving, graceful=True)
    print(f"  {leaving} left at {run.samples[-1]} samples")
    run.wait(lambda: run.world() == 1, "the resize to 1 worker")
    kill_at = run.samples[-1] + rng.randint(1, 8) * BATCH
    run.wait(lambda: run.samples[-1] >= kill_at, f"{kill_at} samples")
    (victim,) = train_workers()
    os.kill(victim.pid, signal.SIGKILL)
    print(f"  killed worker {victim.pid} at {run.samples[-1]} samples")
    check_run(run, run.finish(), tmp_path, planned=2 * SAMPLES, world=1, workers=[2, 1, 1])
