"""A local S3 API server (moto) in its own process that counts the bytes it sends.

The server runs in a child process, not a thread: rasterio can hold the GIL while GDAL waits for
an HTTP reply, so an in-process server deadlocks against a decimated `/vsis3/` read. The child
wraps moto's WSGI application in a counter of response-body bytes and requests, served at
`GET /_uhr/stats`, so tests and benchmarks can assert on the bytes a read really fetched.

Needs moto's server extra (`pip install "moto[server,s3]"`, part of uhr's `dev` extra).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from uhr.storage import StorageConfig

STATS_PATH = "/_uhr/stats"
REGION = "us-east-1"
# Fake credentials, set only in the environment of the code under test (see `client_env`).
FAKE_ACCESS_KEY_ID = "uhr-not-a-real-access-key-id"
FAKE_SECRET_ACCESS_KEY = "uhr-not-a-real-secret-access-key"
# Shaped like an AWS access key id (AKIA + 16), for tests of what recognises one by its shape;
# assembled so that no credential-shaped literal sits in the tree.
FAKE_SHAPED_KEY_ID = "AKIA" + "UHRTESTNOTREAL00"


@dataclass(frozen=True)
class ServerStats:
    """Counters of one server since it started, or a difference of two readings."""

    requests: int = 0
    get_requests: int = 0
    bytes_sent: int = 0

    def __sub__(self, other: ServerStats) -> ServerStats:
        return ServerStats(
            requests=self.requests - other.requests,
            get_requests=self.get_requests - other.get_requests,
            bytes_sent=self.bytes_sent - other.bytes_sent,
        )


@dataclass
class Measurement:
    """What the server sent while a `LocalS3Server.measure()` block ran (set when it exits)."""

    stats: ServerStats = field(default_factory=ServerStats)

    @property
    def bytes_sent(self) -> int:
        return self.stats.bytes_sent

    @property
    def requests(self) -> int:
        return self.stats.requests


class LocalS3Server:
    """moto's S3 API on 127.0.0.1 (a free port) in a child process.

    Use as a context manager. Clients need the fake credentials and the endpoint: apply
    `client_env()` to the environment of the code under test (GDAL and botocore read it there).
    """

    def __init__(self, host: str = "127.0.0.1", startup_timeout_s: float = 60.0):
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[str] | None = None
        self._log: Any = None
        self._port: int | None = None
        self._client: Any = None

    @property
    def endpoint_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the S3 server is not running; call start() first")
        return f"http://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> LocalS3Server:
        """Start the child process and wait until it listens."""
        self._log = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "uhr.testing.s3_server", "--host", self.host],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        ready, _, _ = select.select([self._process.stdout], [], [], self.startup_timeout_s)
        line = self._process.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the local S3 server did not start: {line!r} {self._log_tail()}")
        self._port = int(line.split()[1])
        return self

    def stop(self) -> None:
        """Stop the child process (SIGTERM, then SIGKILL) and close its log."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process.stdout.close()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._port = None
        self._client = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client_env(self) -> dict[str, str]:
        """Environment for clients of this server: fake credentials, endpoint, region, no IMDS."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        return {
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            # No instance-metadata probes (GDAL, botocore) when a credential is missing.
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def storage(self) -> StorageConfig:
        """A `StorageConfig` for this server."""
        return StorageConfig(endpoint_url=self.endpoint_url, region=REGION)

    @property
    def client(self) -> Any:
        """A boto3 S3 client for this server (fake credentials given explicitly)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=REGION,
                aws_access_key_id=FAKE_ACCESS_KEY_ID,
                aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
            )
        return self._client

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a fresh name starting with `prefix`; return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def stats(self) -> ServerStats:
        """The server's counters now."""
        return read_stats(self.endpoint_url)

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Measure what the server sends while the block runs: `with server.measure() as m:`."""
        measurement = Measurement()
        before = self.stats()
        yield measurement
        measurement.stats = self.stats() - before

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-2000:]


def read_stats(endpoint_url: str) -> ServerStats:
    """The counters of the server at `endpoint_url`, from any process."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(endpoint_url + STATS_PATH, timeout=10) as response:
        return ServerStats(**json.load(response))


class _CountingApp:
    """WSGI middleware: counts requests and response-body bytes, serves them at STATS_PATH."""

    def __init__(self, app: Any):
        self._app = app
        self._lock = threading.Lock()
        self._requests = 0
        self._get_requests = 0
        self._bytes_sent = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == STATS_PATH:
            with self._lock:
                body = json.dumps(
                    {"requests": self._requests, "get_requests": self._get_requests, "bytes_sent": self._bytes_sent}
                ).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        # Counted before the reply goes out, so a client that has its reply sees it counted.
        with self._lock:
            self._requests += 1
            self._get_requests += environ.get("REQUEST_METHOD") == "GET"
        return self._count(self._app(environ, start_response))

    def _count(self, body: Iterable[bytes]) -> Iterator[bytes]:
        try:
            for chunk in body:
                with self._lock:
                    self._bytes_sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


def main(argv: list[str] | None = None) -> None:
    """Serve moto's S3 API with counters; print "listening <port>" once bound."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = _CountingApp(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    port = server.server_address[1]
    # moto builds some URLs (presigned, multipart) from this.
    os.environ["MOTO_PORT"] = str(port)
    print(f"listening {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
