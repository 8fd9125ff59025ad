"""Autoscaling, for real: the worker types of cluster/aws-gpu.yaml on Ray's fake multi-node provider.

A head with no CPUs and the launcher's worker types (their resources, minima and maxima; idle
timeout shortened, CPUs capped for this 2-core machine; GPUs are logical resources here) run as
real Ray nodes on this machine, with token auth on as in the launcher config. A job submitted
with `ray job submit --working-dir` whose actor pool asks for GPUs must start with no GPU worker,
make the autoscaler add GPU workers, write every row, and see the GPU workers removed once they
have been idle for the idle timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import ray

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

IDLE_TIMEOUT_S = 15
MAX_NODE_CPUS = 2
OBJECT_STORE_BYTES = 150 * 1024**2
# The fake provider tags its head node with this type name.
FAKE_HEAD_TYPE = "ray.head.default"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_autoscaling_config(launcher: dict[str, Any], gcs_address: str, idle_timeout_s: float) -> dict[str, Any]:
    """The launcher config's node types on Ray's fake multi-node provider.

    Resources, minima and maxima are the launcher's, except that logical CPUs are capped at
    MAX_NODE_CPUS (Ray Data starts a process per free CPU) and each node gets a small object store.
    """
    node_types = {}
    for name, spec in launcher["available_node_types"].items():
        resources = dict(spec["resources"])
        if name == launcher["head_node_type"]:
            node_types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        resources["CPU"] = min(resources.get("CPU", 0), MAX_NODE_CPUS)
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
        while True:
            try:
                self.nodes()
                return
            except OSError:
                if self.head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not start:\n{self.log_tail('head.log')}") from None
                time.sleep(0.5)

    def log_tail(self, name: str, chars: int = 6000) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _state(self, resource: str) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/{resource}?detail=1&limit=10000",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"]["result"]["result"]

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster has had (state API): node_id, state, resources_total, times."""
        return self._state("nodes")

    def actors(self) -> list[dict[str, Any]]:
        return self._state("actors")

    def submit(self, working_dir: Path, entrypoint: list[str], log_name: str = "job.log") -> subprocess.Popen:
        """`ray job submit --working-dir <dir> -- <entrypoint>`, as the README says; it returns when
        the job ends, with exit status 0 when it succeeded."""
        command = [str(BIN / "ray"), "job", "submit", f"--address={self.dashboard}", "--working-dir", str(working_dir)]
        log = (self.root / log_name).open("w")
        return subprocess.Popen(
            command + ["--", *entrypoint], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

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
def fake_cluster(launcher: dict[str, Any]) -> Iterator[FakeCluster]:
    cluster = FakeCluster(launcher)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _node_type(node: dict[str, Any], launcher: dict[str, Any]) -> str:
    """The launcher node type of a node, from the GPUs and custom resources it was started with."""
    if node["is_head_node"]:
        return launcher["head_node_type"]
    total = node["resources_total"]
    for name, spec in launcher["available_node_types"].items():
        wanted = {key: value for key, value in spec["resources"].items() if key != "CPU"}
        if name != launcher["head_node_type"] and total.get("GPU", 0) == wanted.get("GPU", 0):
            if all(total.get(key) == value for key, value in wanted.items()):
                return name
    raise AssertionError(f"a node with resources {total} matches no node type")


TOY_JOB = """
import sys
import time

import ray


class Square:
    def __call__(self, batch):
        time.sleep(0.5)
        batch["square"] = batch["id"] ** 2
        return batch


ds = ray.data.range(16, override_num_blocks=8)
ds = ds.map_batches(Square, compute=ray.data.ActorPoolStrategy(min_size=2, max_size=2), num_gpus=1, batch_size=2)
ds.write_parquet(sys.argv[1])
"""


@dataclass
class Snapshot:
    """What the cluster looked like at `time_ms`: its nodes, and the nodes running a live actor."""

    time_ms: float
    nodes: list[dict[str, Any]]
    busy: set[str]


def snapshot(cluster: FakeCluster) -> Snapshot:
    busy = {actor["node_id"] for actor in cluster.actors() if actor["state"] == "ALIVE"}
    return Snapshot(time.time() * 1000, cluster.nodes(), busy)


def test_gpu_workers_come_with_the_job_and_go_when_idle(
    fake_cluster: FakeCluster, launcher: dict[str, Any], tmp_path: Path
) -> None:
    gpu_types = {name for name, spec in launcher["available_node_types"].items() if spec["resources"].get("GPU")}
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.py").write_text(TOY_JOB)
    output = tmp_path / "out"

    def gpu_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [node for node in nodes if _node_type(node, launcher) in gpu_types]

    # 1. The cluster starts with no GPU worker.
    assert gpu_nodes(fake_cluster.nodes()) == []
    submitted_ms = time.time() * 1000
    job = fake_cluster.submit(job_dir, ["python", "job.py", str(output)])
    timeline = []
    deadline = time.monotonic() + 300
    while job.poll() is None:
        assert time.monotonic() < deadline, f"job did not finish in 300 s:\n{fake_cluster.log_tail('job.log')}"
        timeline.append(snapshot(fake_cluster))
        time.sleep(1)
    assert job.returncode == 0, fake_cluster.log_tail("job.log")
    ended_ms = time.time() * 1000

    # 2. The autoscaler added GPU workers for the job, of the launcher's GPU types, within their maxima.
    added = gpu_nodes(fake_cluster.nodes())
    assert added, "no GPU worker was added"
    assert all(submitted_ms < node["start_time_ms"] < ended_ms for node in added)
    for name in gpu_types:
        count = len([node for node in added if _node_type(node, launcher) == name])
        assert count <= launcher["available_node_types"][name]["max_workers"], name
    # The job's GPU actors ran there.
    assert {node["node_id"] for node in added} <= set().union(*(shot.busy for shot in timeline))

    # 3. Every row was written.
    assert pq.read_table(output).num_rows == 16

    # 4. The GPU workers are removed once idle for the idle timeout, not before.
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 90
    while any(node["state"] == "ALIVE" for node in gpu_nodes(timeline[-1].nodes)):
        assert time.monotonic() < deadline, "GPU workers still up long after the idle timeout"
        time.sleep(1)
        timeline.append(snapshot(fake_cluster))
    for node in gpu_nodes(timeline[-1].nodes):
        assert node["state_message"].startswith("Expected termination"), node
        last_busy_ms = max(shot.time_ms for shot in timeline if node["node_id"] in shot.busy)
        first_idle_ms = min(
            shot.time_ms for shot in timeline if shot.time_ms > last_busy_ms and node["node_id"] not in shot.busy
        )
        # Idle from some time in (last_busy, first_idle]; removed IDLE_TIMEOUT_S after that.
        assert (node["end_time_ms"] - first_idle_ms) / 1000 >= IDLE_TIMEOUT_S - 3, node
        assert (node["end_time_ms"] - last_busy_ms) / 1000 <= IDLE_TIMEOUT_S + 60, node
