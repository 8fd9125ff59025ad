"""How many bytes reading a scene from object storage cost, from GDAL's own network counters.

GDAL counts what it downloads per `/vsi` file once `CPL_VSIL_NETWORK_STATS_ENABLED=YES` is set
(`StorageConfig.gdal_env()` sets it); rasterio does not expose the counters, so they are read from
the GDAL library rasterio loaded. Local files are not metered: no counter tells the bytes GDAL read
from one file apart from everything else the process reads (libraries, PROJ's database).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import json
import logging
import os
import threading

from uhr.storage import is_remote, to_gdal_path

logger = logging.getLogger(__name__)


@functools.cache
def _gdal_library() -> ctypes.CDLL | None:
    import rasterio

    # Wheels bundle GDAL next to the package; other installs link the system library.
    bundled = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*"))
    path = bundled[0] if bundled else ctypes.util.find_library("gdal")
    if path is None:
        logger.warning("GDAL library not found: remote bytes read will not be reported")
        return None
    library = ctypes.CDLL(path)
    library.VSINetworkStatsGetAsSerializedJSON.restype = ctypes.c_void_p
    library.VSINetworkStatsGetAsSerializedJSON.argtypes = [ctypes.c_char_p]
    library.VSIFree.argtypes = [ctypes.c_void_p]
    library.VSINetworkStatsReset.restype = None
    library.VSINetworkStatsReset.argtypes = []
    return library


def gdal_downloaded_bytes(uri: str) -> int | None:
    """Bytes GDAL has downloaded for `uri` in this process so far (None if it cannot tell)."""
    library = _gdal_library()
    if library is None:
        return None
    pointer = library.VSINetworkStatsGetAsSerializedJSON(None)
    if not pointer:
        return 0
    try:
        stats = json.loads(ctypes.string_at(pointer).decode())
    finally:
        library.VSIFree(pointer)
    path = to_gdal_path(uri)
    # One entry per network handler this process used (vsis3, vsicurl, ...); the file is under its own.
    return sum(
        method.get("downloaded_bytes", 0)
        for handler in stats.get("handlers", {}).values()
        for method in handler.get("files", {}).get(path, {}).get("methods", {}).values()
    )


class _OpenMeters:
    """How many remote `ReadMeter`s of this process are counting, under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0


_OPEN = _OpenMeters()


class ReadMeter:
    """`with ReadMeter(uri) as meter: ...` then `meter.bytes`: what the block downloaded of `uri`.

    None for local files and where GDAL's counters cannot be read. GDAL keeps a counter per file for
    the life of the process, and every reading serialises all of them: they are emptied whenever no
    meter of the process is counting, so a long-lived worker's readings stay small and cheap.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.remote = is_remote(uri)
        self.bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> ReadMeter:
        if self.remote:
            with _OPEN.lock:
                _OPEN.count += 1
                self._start = gdal_downloaded_bytes(self.uri)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.remote:
            return
        with _OPEN.lock:
            end = gdal_downloaded_bytes(self.uri)
            _OPEN.count -= 1
            library = _gdal_library()
            if _OPEN.count == 0 and library is not None:
                library.VSINetworkStatsReset()
        self.bytes = None if end is None or self._start is None else end - self._start
