"""A local Ray and small synthetic archives for the VQA job tests (the tiny model: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from uhr.synth import ArchiveIndex, write_archive


@pytest.fixture(scope="package")
def ray_local(s3_server) -> Iterator[None]:
    """One local Ray for the package's in-process runs, started after the S3 server so its workers
    inherit the server's endpoint and test credentials."""
    ray.init(address="local", num_cpus=2, log_to_driver=False)  # its dashboard serves list_actors
    yield
    ray.shutdown()


@pytest.fixture(scope="package")
def archive(tmp_path_factory: pytest.TempPathFactory) -> ArchiveIndex:
    """Three 512-px synthetic scenes with 4 questions each, on local disk."""
    root = tmp_path_factory.mktemp("archive")
    return write_archive(str(root), scenes=3, size=512, seed=5, questions_per_scene=4)


@pytest.fixture
def s3_archive(s3_server, archive: ArchiveIndex) -> str:
    """The archive uploaded to a fresh bucket of the local S3 server; returns its s3:// root.

    Fresh per test: GDAL caches what it downloaded per object in each (reused) worker process, so
    a second read of the same object would rightly count no bytes."""
    bucket = s3_server.new_bucket("archive")
    root = Path(archive.root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3_server.client.upload_file(str(path), bucket, f"archive/{path.relative_to(root)}")
    return f"s3://{bucket}/archive"
