"""A local Ray, a tiny saved model and small synthetic archives for the VQA job tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from uhr.model import build_tiny_model, save_model
from uhr.pipeline.defaults import TINY_PRUNING_DEFAULTS
from uhr.synth import ArchiveIndex, write_archive


@pytest.fixture(scope="package")
def ray_local(s3_server) -> Iterator[None]:
    """One local Ray for the package's in-process runs, started after the S3 server so its workers
    inherit the server's endpoint and test credentials."""
    ray.init(address="local", num_cpus=2, log_to_driver=False)  # its dashboard serves list_actors
    yield
    ray.shutdown()


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in our export format, with pruning defaults for its 32-px tiles."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    model, _ = build_tiny_model(seed=0, pruning_defaults=TINY_PRUNING_DEFAULTS)
    save_model(model, path)
    return path


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
