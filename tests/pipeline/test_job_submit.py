"""`ray job submit --working-dir . -- python -m jobs.vqa ...` against a real `ray start --head`."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from .helpers import read_manifest, read_rows

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A one-node cluster started as users start one (`ray start --head`), token auth on as on our
    clusters; yields a job client that sends the token."""
    port, dashboard_port = _free_port(), _free_port()
    # Every port of its own: the package's in-process Ray may hold the defaults (its dashboard
    # agent on 52365), and an agent that cannot bind leaves the head with "No available agent".
    agent_ports = [
        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
    ]  # fmt: skip
    # Short path: Ray's unix sockets live under the temp dir.
    temp_dir = tempfile.mkdtemp(prefix="uhr-ray-", dir="/tmp")
    token_path = Path(temp_dir) / "auth_token"
    token = secrets.token_hex(32)
    token_path.write_text(token)
    token_path.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # No drain on SIGTERM: Ray Data's detached actors outlive the job, so the node would never go
    # idle and the teardown would wait out the whole 30-s drain.
    no_drain = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env = {**os.environ, **auth, **no_drain, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        *agent_ports,
    ]  # fmt: skip
    head = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard_port}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = JobSubmissionClient(url, headers=headers)
                client.list_jobs()
                break
            except Exception:  # the dashboard is not up yet
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield client
    finally:
        # `ray start --block` stops its node's processes when terminated; `ray stop` would kill every
        # Ray on the machine.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_with_working_dir_runs_the_job(ray_head, archive, model_dir, tmp_path):
    output = tmp_path / "answers"
    client = ray_head
    entrypoint = (
        f"python -m jobs.vqa --questions {archive.questions_parquet} --scenes {archive.root} "
        f"--output {output} --model {model_dir} max_new_tokens=2"
    )
    deadline = time.monotonic() + 300
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
            break
        except RuntimeError as error:  # the head's job agent registers a little after the dashboard
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"the submitted job is still {status}: {client.get_job_logs(job_id)[-3000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "completed" in logs and "rows written   12" in logs, logs[-3000:]
    rows = read_rows(str(output))
    assert rows.num_rows == 12 and rows["error"].null_count == 12
    assert read_manifest(str(output))["status"] == "complete"
