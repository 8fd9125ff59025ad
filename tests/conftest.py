"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from uhr.model import build_tiny_model, save_model
from uhr.pipeline.defaults import TINY_PRUNING_DEFAULTS
from uhr.testing.s3_server import LocalS3Server

# Variables that could point clients at a real account; cleared while the S3 server is up.
_REAL_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_NO_SIGN_REQUEST",
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    """A real S3 API server (moto, in its own process) on 127.0.0.1 for the whole session.

    While it runs, the environment holds fake credentials, `AWS_ENDPOINT_URL` pointing at it and
    `AWS_REGION`, so `StorageConfig()` (GDAL and s3fs alike), boto3 and Ray workers started
    afterwards all reach it; the previous environment comes back at the end of the session.

    What it yields (`uhr.testing.s3_server.LocalS3Server`):
    - `endpoint_url` ("http://127.0.0.1:<port>"), `storage()` (a `StorageConfig` for it),
      `client` (boto3), `new_bucket(prefix)` (creates a bucket with a fresh name; use one per
      test, the server's state lasts the session);
    - `stats()` and `with s3_server.measure() as m: ...` then `m.bytes_sent` / `m.requests`:
      response-body bytes and requests the server really sent, for bytes-read assertions.
    s3fs caches listings per process: list through a fresh prefix, or `fs.invalidate_cache()`.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in _REAL_AWS_VARS:
            patch.delenv(name, raising=False)
        with LocalS3Server() as server:
            for name, value in server.client_env().items():
                patch.setenv(name, value)
            yield server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model (`build_tiny_model(seed=0)`) in our export format, with the pruning
    defaults for its 32-px tiles; saved once and loaded by the tests through `load_model`."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    model, _ = build_tiny_model(seed=0, pruning_defaults=TINY_PRUNING_DEFAULTS)
    save_model(model, path)
    return path
