"""The local S3 test server: its own process, real S3 API, exact byte counts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from uhr.testing.s3_server import LocalS3Server


def test_server_counts_the_body_bytes_it_sends(s3_server):
    bucket = s3_server.new_bucket("counting")
    body = os.urandom(300_000)
    s3_server.client.put_object(Bucket=bucket, Key="blob.bin", Body=body)
    with s3_server.measure() as whole:
        assert s3_server.client.get_object(Bucket=bucket, Key="blob.bin")["Body"].read() == body
    with s3_server.measure() as ranged:
        part = s3_server.client.get_object(Bucket=bucket, Key="blob.bin", Range="bytes=1000-1999")["Body"].read()
    assert part == body[1000:2000]
    assert (whole.requests, whole.bytes_sent) == (1, len(body))
    assert (ranged.requests, ranged.stats.get_requests, ranged.bytes_sent) == (1, 1, 1000)


def test_fixture_environment_points_clients_at_the_server(s3_server):
    assert s3_server.pid is not None and s3_server.pid != os.getpid()
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    filesystem = s3_server.storage().filesystem("s3://")
    bucket = s3_server.new_bucket("env")
    filesystem.pipe(f"s3://{bucket}/a.txt", b"hello")
    assert s3_server.client.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"hello"


def test_a_second_server_starts_on_its_own_port_and_stops():
    with LocalS3Server() as server:
        endpoint = server.endpoint_url
        assert server.stats().requests == 0
        server.new_bucket()
        assert server.stats().requests == 1
    assert server.pid is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint + "/_uhr/stats", timeout=5)
    with pytest.raises(RuntimeError, match="not running"):
        server.endpoint_url
