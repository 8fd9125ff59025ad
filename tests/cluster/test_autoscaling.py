"""Autoscaling, for real: the worker types of cluster/aws-gpu.yaml on Ray's fake multi-node provider.

A head with no CPUs and the launcher's worker types (their resources, minima and maxima; idle
timeout shortened; logical CPUs divided by CPU_SCALE for this 2-core machine; GPUs are logical
resources here) run as real Ray nodes on this machine, with token auth on as in the launcher
config. The VQA job, submitted with `ray job submit` on configs/vqa/cluster.yaml as the RayJobs
run it, and reading scenes and model from an S3 API server, must start with no GPU worker, make
the autoscaler add GPU workers for its actor pool, write every row, and see the GPU workers
removed once they have been idle for the idle timeout.

One difference from AWS: there, `ray up` fills in each worker type's `memory` from the instance
type; the fake provider cannot start nodes with a declared `memory`, so the autoscaler learns a
type's memory only once a node of that type runs. Work that asks for memory (the read tasks) can
then be placed only on types already running, and may bring more GPU workers than on AWS, where
it would bring a `cpu-reader`. The test therefore asks for at least the pool's GPUs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from uhr.config import load_config
from uhr.model import build_tiny_model, save_model
from uhr.pipeline.config import VqaConfig
from uhr.pipeline.defaults import TINY_PRUNING_DEFAULTS
from uhr.synth import write_archive
from uhr.testing.s3_server import LocalS3Server

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

IDLE_TIMEOUT_S = 15
# Logical CPUs of the fake nodes are the launcher's divided by this, so that CPU-to-GPU ratios, and
# with them the autoscaler's choice of node type, stay those of the real instances.
CPU_SCALE = 4
OBJECT_STORE_BYTES = 150 * 1024**2
# The fake provider tags its head node with this type name.
FAKE_HEAD_TYPE = "ray.head.default"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_autoscaling_config(launcher: dict[str, Any], gcs_address: str, idle_timeout_s: float) -> dict[str, Any]:
    """The launcher config's node types on Ray's fake multi-node provider.

    Resources, minima and maxima are the launcher's, except that logical CPUs are divided by
    CPU_SCALE (this machine has 2 cores) and each node gets a small object store.
    """
    node_types = {}
    for name, spec in launcher["available_node_types"].items():
        resources = dict(spec["resources"])
        if name == launcher["head_node_type"]:
            node_types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        resources["CPU"] = resources.get("CPU", 0) // CPU_SCALE
        resources["object_store_memory"] = OBJECT_STORE_BYTES
        node_types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": spec["max_workers"],
        }
    return {
        "cluster_name": "uhr-fake",
        "max_workers": launcher["max_workers"],
        "upscaling_speed": launcher["upscaling_speed"],
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    """A fake multi-node Ray cluster run from this process; every process it starts is ended by
    `stop()`, by id (the head's process tree and the processes of its session directory)."""

    launcher: dict[str, Any]
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="uhr-ray-", dir="/tmp")))
    head: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        # Short root: Ray's unix socket paths under the session directory must stay < 108 bytes.
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.gcs_address = f"{ray.util.get_node_ip_address()}:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(32)
        token_path = self.root / "auth_token"
        token_path.write_text(self.token)
        token_path.chmod(0o600)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def start(self, timeout_s: float = 120) -> None:
        config = self.root / "autoscaling.json"
        config.write_text(json.dumps(fake_autoscaling_config(self.launcher, self.gcs_address, IDLE_TIMEOUT_S)))
        head_resources = self.launcher["available_node_types"][self.launcher["head_node_type"]]["resources"]
        command = [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--port={self.gcs_port}",
            f"--autoscaling-config={config}",
            f"--num-cpus={head_resources.get('CPU', 0)}",
            f"--num-gpus={head_resources.get('GPU', 0)}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.root / 'ray'}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-agent-listen-port=0",
            f"--ray-client-server-port={_free_port()}",
        ]  # fmt: skip
        log = (self.root / "head.log").open("w")
        self.head = subprocess.Popen(
            command, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        # Up when the dashboard answers and the autoscaler has reported once.
        while True:
            try:
                if "autoscalerReport" in (self.autoscaler_status() or {}):
                    return
            except OSError:
                pass
            if self.head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not start:\n{self.log_tail('head.log')}")
            time.sleep(0.5)

    def log_tail(self, name: str, chars: int = 6000) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _get(self, path: str, attempts: int = 3) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"})
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.load(response)["data"]
            except urllib.error.HTTPError as error:
                # The dashboard answers 500 while a node it asks is going away.
                if error.code < 500 or attempt == attempts:
                    raise
                time.sleep(1)
        raise ValueError(f"attempts must be >= 1, got {attempts}")

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster has had (state API): node_id, state, state_message, start/end times."""
        return self._get("/api/v0/nodes?detail=1&limit=10000")["result"]["result"]

    def actors(self) -> list[dict[str, Any]]:
        return self._get("/api/v0/actors?detail=1&limit=10000")["result"]["result"]

    def autoscaler_status(self) -> dict[str, Any]:
        """What the autoscaler last reported: node types by node id, resource use by node id."""
        return self._get("/api/cluster_status")["clusterStatus"]

    def submit(self, runtime_env: dict[str, Any], entrypoint: list[str], log_name: str = "job.log") -> subprocess.Popen:
        """`ray job submit --runtime-env-json ... -- <entrypoint>`; returns when the job ends, with
        exit status 0 when it succeeded."""
        command = [
            str(BIN / "ray"), "job", "submit", f"--address={self.dashboard}",
            "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint,
        ]  # fmt: skip
        log = (self.root / log_name).open("w")
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _own_processes(self) -> list[psutil.Process]:
        found = {}
        if self.head is not None:
            try:
                head = psutil.Process(self.head.pid)
                found = {proc.pid: proc for proc in [head, *head.children(recursive=True)]}
            except psutil.NoSuchProcess:
                pass
        # Processes of this cluster's nodes whose parent has already gone: they name our root.
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(str(self.root) in arg for arg in proc.info["cmdline"] or ()):
                found.setdefault(proc.pid, proc)
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        processes = self._own_processes()
        for proc in processes:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture()
def fake_cluster(s3_server: LocalS3Server, launcher: dict[str, Any]) -> Iterator[FakeCluster]:
    """The fake cluster, started after the S3 server so that its nodes, like instances with an
    instance profile, find the endpoint and (test) credentials in their environment."""
    cluster = FakeCluster(launcher)
    try:
        try:
            cluster.start()
        except RuntimeError:
            # A head that times out on an overloaded machine gets one more try, from scratch.
            cluster.stop()
            cluster = FakeCluster(launcher)
            cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture()
def s3_inputs(s3_server: LocalS3Server, tmp_path: Path) -> dict[str, Any]:
    """A small synthetic archive and the tiny model in a fresh bucket, as a cluster would read them."""
    bucket = s3_server.new_bucket("cluster")
    archive = write_archive(
        f"s3://{bucket}/archive", scenes=2, size=512, seed=11, questions_per_scene=3, storage=s3_server.storage()
    )
    model, _ = build_tiny_model(seed=0, pruning_defaults=TINY_PRUNING_DEFAULTS)
    save_model(model, tmp_path / "model")
    for path in sorted((tmp_path / "model").rglob("*")):
        if path.is_file():
            s3_server.client.upload_file(str(path), bucket, f"model/{path.relative_to(tmp_path / 'model')}")
    return {"archive": archive, "model": f"s3://{bucket}/model", "output": f"s3://{bucket}/answers"}


def vqa_entrypoint(inputs: dict[str, Any], region: str) -> list[str]:
    """The RayJobs' entrypoint with these inputs, float32 (the "GPUs" are CPUs), two tokens per
    answer, actor CPUs divided by CPU_SCALE as the nodes' are, and a pool of two actors from the
    start, so that the autoscaler must add GPU workers with two GPUs in all."""
    archive = inputs["archive"]
    encode = load_config(VqaConfig, REPO / "configs" / "vqa" / "cluster.yaml").encode
    return [
        "python", "-m", "jobs.vqa", "--config", "configs/vqa/cluster.yaml",
        f"model={inputs['model']}",
        f"scenes={archive.root}",
        f"questions={archive.questions_parquet}",
        f"output={inputs['output']}",
        f"storage.region={region}",
        "precision=float32",
        f"encode.num_cpus={encode.num_cpus / CPU_SCALE}",
        "encode.min_actors=2",
        "encode.max_actors=2",
        "max_new_tokens=2",
        "status_interval_s=5",
    ]  # fmt: skip


@dataclass
class Snapshot:
    """What the autoscaler reported at `time_ms`: the type of each node, and the nodes with resources
    in use (a node is idle, for the idle timeout, when none of its resources are)."""

    time_ms: float
    types: dict[str, str]
    busy: set[str]


def snapshot(cluster: FakeCluster) -> Snapshot:
    status = cluster.autoscaler_status()
    usage = status["loadMetricsReport"]["usageByNode"] or {}
    held = {
        node: [used for name, (used, _) in resources.items() if name != "objectStoreMemory" and not name.startswith("node:")]
        for node, resources in usage.items()
    }
    busy = {node for node, used in held.items() if any(amount > 0 for amount in used)}
    # Timed when the autoscaler made the report, not when it was read: reads lag on a busy machine.
    return Snapshot(status["time"] * 1000, dict(status["autoscalerReport"]["nodeTypeMapping"] or {}), busy)


def test_gpu_workers_come_with_the_vqa_job_and_go_when_idle(
    fake_cluster: FakeCluster, s3_inputs: dict[str, Any], s3_server: LocalS3Server, launcher: dict[str, Any]
) -> None:
    gpu_types = {name for name, spec in launcher["available_node_types"].items() if spec["resources"].get("GPU")}
    timeline: list[Snapshot] = []

    def gpu_nodes() -> dict[str, dict[str, Any]]:
        """The GPU workers the cluster has had (alive or not), by node id, with their type."""
        types = {node: kind for shot in timeline for node, kind in shot.types.items()}
        return {
            node["node_id"]: {**node, "type": types[node["node_id"]]}
            for node in fake_cluster.nodes()
            if types.get(node["node_id"]) in gpu_types
        }

    # 1. The cluster starts with no GPU worker.
    timeline.append(snapshot(fake_cluster))
    assert set(timeline[0].types.values()) == {FAKE_HEAD_TYPE}
    submitted_ms = time.time() * 1000
    # The checkout in place on every node, as the RayJobs use the image's (`local://`): an uploaded
    # working_dir would be unpacked by each fake node into the one session directory they share,
    # pulling the directory from under the workers of the nodes already running.
    runtime_env = {"working_dir": f"local://{REPO}"}
    job = fake_cluster.submit(runtime_env, vqa_entrypoint(s3_inputs, s3_server.storage().region))
    deadline = time.monotonic() + 300
    while job.poll() is None:
        assert time.monotonic() < deadline, f"job did not finish in 300 s:\n{fake_cluster.log_tail('job.log')}"
        timeline.append(snapshot(fake_cluster))
        time.sleep(1)
    assert job.returncode == 0, fake_cluster.log_tail("job.log")
    ended_ms = time.time() * 1000
    timeline.append(snapshot(fake_cluster))

    # 2. The autoscaler added GPU workers of the launcher's GPU types during the job, within their
    # maxima, with GPUs enough for the pool's two encode actors (one GPU each), which ran on them:
    # on one node where it chose a type with several GPUs, on two where it chose one-GPU types.
    added = gpu_nodes()
    added_gpus = sum(launcher["available_node_types"][node["type"]]["resources"]["GPU"] for node in added.values())
    assert added_gpus >= 2, f"{len(added)} GPU workers were added:\n{fake_cluster.log_tail('job.log')}"
    assert all(submitted_ms < node["start_time_ms"] < ended_ms for node in added.values())
    for kind in gpu_types:
        maximum = launcher["available_node_types"][kind]["max_workers"]
        assert sum(node["type"] == kind for node in added.values()) <= maximum, kind
    gpu_actors = [actor for actor in fake_cluster.actors() if (actor["required_resources"] or {}).get("GPU")]
    assert all(actor["class_name"] == "MapWorker(MapBatches(EncodeStage))" for actor in gpu_actors), gpu_actors
    assert len(gpu_actors) >= 2 and all(actor["required_resources"]["GPU"] == 1 for actor in gpu_actors)
    # Any number of hosts: an actor that dies (Ray restarts it) may come back on another worker, and
    # a restart still pending when the job ends has no node. GPU hosts are told by the state API's own
    # resources: a worker that died within seconds may never appear in an autoscaler report.
    actor_nodes = {actor["node_id"] for actor in gpu_actors if actor["node_id"] is not None}
    gpu_hosts = {node["node_id"]: node for node in fake_cluster.nodes() if node["resources_total"].get("GPU")}
    assert actor_nodes and actor_nodes <= set(gpu_hosts), (actor_nodes, sorted(gpu_hosts))
    assert all(submitted_ms < gpu_hosts[node]["start_time_ms"] < ended_ms for node in actor_nodes)

    # 3. Every question has its answer row, and no row is an error.
    fs = s3_server.storage().filesystem(s3_inputs["output"])
    rows = pa.concat_tables(
        pq.read_table(fs.open(part, "rb")) for part in sorted(fs.glob(f"{s3_inputs['output']}/part-*.parquet"))
    )
    expected = pq.read_table(fs.open(s3_inputs["archive"].questions_parquet, "rb"))["question_id"].to_pylist()
    assert sorted(rows["question_id"].to_pylist()) == sorted(expected)
    assert rows["error"].null_count == rows.num_rows, rows["error"].to_pylist()
    assert rows["answer"].null_count == 0

    # 4. The GPU workers are removed once idle for the idle timeout, not before.
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 90
    while any(node["state"] == "ALIVE" for node in gpu_nodes().values()):
        assert time.monotonic() < deadline, "GPU workers still up long after the idle timeout"
        time.sleep(1)
        timeline.append(snapshot(fake_cluster))
    for node_id, node in gpu_nodes().items():
        assert node["state"] == "DEAD" and node["state_message"].startswith("Expected termination"), node
        last_busy_ms = max((shot.time_ms for shot in timeline if node_id in shot.busy), default=node["start_time_ms"])
        later = [shot.time_ms for shot in timeline if shot.time_ms > last_busy_ms]
        first_idle_ms = min(later, default=node["end_time_ms"])
        # Idle from some time in (last_busy, first_idle]; removed IDLE_TIMEOUT_S after that.
        assert (node["end_time_ms"] - first_idle_ms) / 1000 >= IDLE_TIMEOUT_S - 3, node
        assert (node["end_time_ms"] - last_busy_ms) / 1000 <= IDLE_TIMEOUT_S + 60, node
        logger.info(
            "%s worker up %.1f s after submission; idle from %.1f s before the job ended; removed %.1f-%.1f s "
            "after it became idle",
            node["type"],
            (node["start_time_ms"] - submitted_ms) / 1000,
            (ended_ms - last_busy_ms) / 1000,
            (node["end_time_ms"] - first_idle_ms) / 1000,
            (node["end_time_ms"] - last_busy_ms) / 1000,
        )
    logger.info("job: %.1f s from submission to success", (ended_ms - submitted_ms) / 1000)
