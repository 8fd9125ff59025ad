"""Scene listing: every raster under a local directory or an object-store prefix, sorted."""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Sequence

from uhr.errors import StorageError
from uhr.storage import StorageConfig, uri_protocol

DEFAULT_SCENE_PATTERNS: tuple[str, ...] = ("*.tif", "*.tiff", "*.jp2", "*.jpg", "*.jpeg", "*.png")


def list_scenes(
    prefix_uri: str | os.PathLike[str],
    patterns: Sequence[str] = DEFAULT_SCENE_PATTERNS,
    storage: StorageConfig | None = None,
) -> list[str]:
    """URIs of the files under `prefix_uri` (recursively) whose names match one of `patterns`.

    Patterns are shell globs on the file name, case-insensitive ("*.tif" matches "A.TIF").
    Returned URIs keep the prefix's protocol (`s3://bucket/...`; absolute paths for local
    directories) and are sorted, so archive-wide jobs see scenes in a stable order. An existing
    prefix with no match gives []; a missing local directory or bucket raises `StorageError`.
    """
    storage = storage if storage is not None else StorageConfig()
    prefix = os.fspath(prefix_uri)
    protocol = uri_protocol(prefix)
    filesystem = storage.filesystem(prefix)
    lowered = [pattern.lower() for pattern in patterns]
    try:
        # Listings are cached per filesystem instance; an archive may have grown since.
        filesystem.invalidate_cache()
        if protocol in (None, "file", "local") and not filesystem.isdir(prefix):
            raise FileNotFoundError(prefix)
        paths = filesystem.find(prefix)
        # `find` filled the same cache; it would hold every listed key (about 1 KB each on S3) for
        # as long as the process reuses the filesystem.
        filesystem.invalidate_cache()
    except FileNotFoundError:
        raise StorageError(prefix, "no such directory or bucket") from None
    except PermissionError:
        raise StorageError(prefix, "access denied") from None
    except OSError as error:
        raise StorageError(prefix, f"cannot list ({error})") from None
    matches = [
        path for path in paths if any(fnmatch.fnmatchcase(posixpath.basename(path).lower(), p) for p in lowered)
    ]
    if protocol not in (None, "file", "local"):
        matches = [filesystem.unstrip_protocol(path) for path in matches]
    return sorted(matches)
