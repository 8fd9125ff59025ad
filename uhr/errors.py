"""Exceptions and warnings of the `uhr` package.

Every message passes through `uhr.storage.redact`, so a signed URL, a `user:pass@` URI or a secret
key that reaches an error (from a caller, from GDAL, from botocore) never reaches a log.
"""

from __future__ import annotations

from uhr.storage import redact


class UhrError(Exception):
    """Base class of the errors `uhr` raises on purpose."""


class _UriError(UhrError):
    """An error about one URI, with a reason; both redacted, the message from `template`."""

    template = "{uri}: {reason}"

    def __init__(self, uri: str, reason: str):
        self.uri = redact(str(uri))
        self.reason = redact(str(reason))
        super().__init__(self.template.format(uri=self.uri, reason=self.reason))

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling them; keep both fields on the way.
        return (type(self), (self.uri, self.reason))


class SceneError(_UriError):
    """A scene could not be opened or read: missing object, not a raster, corrupt, unsupported.

    `uri` and `reason` are redacted; the message is "cannot read scene <uri>: <reason>".
    """

    template = "cannot read scene {uri}: {reason}"


class StorageError(_UriError):
    """Object storage could not be listed or reached at `uri` (missing bucket or directory, denied).

    `uri` and `reason` are redacted; the message is "storage error at <uri>: <reason>".
    """

    template = "storage error at {uri}: {reason}"


class SceneWarning(UserWarning):
    """A scene is readable but slow or costly to read (no overviews, striped layout, huge tile index)."""
