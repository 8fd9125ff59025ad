"""Listing an archive: local directories and S3 prefixes, sorted, filtered by pattern."""

from __future__ import annotations

import pytest

from uhr.errors import StorageError
from uhr.scenes import list_scenes
from uhr.storage import StorageConfig

SCENES = ["a/scene_1.tiff", "a/scene_10.TIF", "b/scene_2.tif", "c/d/photo.jpg"]
NAMES = ["b/scene_2.tif", "a/scene_10.TIF", "a/scene_1.tiff", "a/notes.txt", "c/d/photo.jpg", "c/photo.png.aux.xml"]


def test_local_directory_is_listed_recursively_sorted_and_filtered(tmp_path):
    for name in NAMES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    expected = sorted(str(tmp_path / name) for name in SCENES)
    assert list_scenes(tmp_path) == expected
    assert list_scenes(tmp_path / "a", patterns=["*.tif"]) == [str(tmp_path / "a/scene_10.TIF")]
    assert list_scenes(tmp_path, patterns=["*.webp"]) == []


def test_s3_prefix_is_listed_with_its_protocol(s3_server):
    bucket = s3_server.new_bucket("listing")
    for name in NAMES:
        s3_server.client.put_object(Bucket=bucket, Key=f"archive/{name}", Body=b"x")
    s3_server.client.put_object(Bucket=bucket, Key="other/scene.tif", Body=b"x")
    expected = sorted(f"s3://{bucket}/archive/{name}" for name in SCENES)
    assert list_scenes(f"s3://{bucket}/archive") == expected
    # The listing leaves nothing in the filesystem's cache: an archive's keys are not held for the run.
    assert not StorageConfig().filesystem(f"s3://{bucket}/archive").dircache
    assert list_scenes(f"s3://{bucket}/archive/", patterns=("scene_1*",)) == [
        f"s3://{bucket}/archive/a/scene_1.tiff",
        f"s3://{bucket}/archive/a/scene_10.TIF",
    ]
    # Objects added later are seen: listings are not served from a stale cache.
    s3_server.client.put_object(Bucket=bucket, Key="archive/e/new.tif", Body=b"x")
    assert f"s3://{bucket}/archive/e/new.tif" in list_scenes(f"s3://{bucket}/archive")
    assert list_scenes(f"s3://{bucket}/nothing-here") == []


def test_missing_directory_or_bucket_is_a_storage_error(tmp_path, s3_server):
    with pytest.raises(StorageError, match=f"storage error at {tmp_path / 'nope'}: no such directory or bucket"):
        list_scenes(tmp_path / "nope")
    with pytest.raises(StorageError, match="s3://no-such-bucket-for-uhr: no such directory or bucket"):
        list_scenes("s3://no-such-bucket-for-uhr")
