"""Exceptions of the `uhr` package.

Every message passes through `uhr.storage.redact`, so a signed URL, a `user:pass@` URI or a secret
key that reaches an error (from a caller, from GDAL, from botocore) never reaches a log.
"""

from __future__ import annotations

from uhr.storage import redact


class UhrError(Exception):
    """Base class of the errors `uhr` raises on purpose."""


class SceneError(UhrError):
    """A scene could not be opened or read: missing object, not a raster, corrupt, unsupported.

    `uri` and `reason` are already redacted; the message is "cannot read scene <uri>: <reason>".
    """

    def __init__(self, uri: str, reason: str):
        self.uri = redact(str(uri))
        self.reason = redact(str(reason))
        super().__init__(f"cannot read scene {self.uri}: {self.reason}")

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling them; keep both fields on the way.
        return (type(self), (self.uri, self.reason))


class StorageError(UhrError):
    """Object storage could not be listed or reached at `uri` (missing bucket or directory, denied).

    `uri` and `reason` are already redacted; the message is "storage error at <uri>: <reason>".
    """

    def __init__(self, uri: str, reason: str):
        self.uri = redact(str(uri))
        self.reason = redact(str(reason))
        super().__init__(f"storage error at {self.uri}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.uri, self.reason))


class SceneWarning(UserWarning):
    """A scene is readable but slow or costly to read (no overviews, striped layout, huge tile index)."""
