"""Scene reader: a raster URI plus a window -> RGB uint8 pixels, with range requests only.

`open_scene` opens a GeoTIFF/COG (or any raster GDAL reads: JPEG, PNG, JP2) from a local path or
an object store (`s3://` through GDAL's `/vsis3/`) and keeps the dataset open, so the header and
tile index are fetched once and every later window costs only its tiles. Coarse views are
decimated reads that GDAL serves from the internal overviews; nothing downloads a whole object.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from types import TracebackType
from urllib.parse import urlsplit

import numpy as np
import rasterio
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Interleaving, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.session import DummySession
from rasterio.transform import GCPTransformer, RPCTransformer, from_gcps
from rasterio.warp import transform as transform_coords
from rasterio.windows import Window
from shapely import affinity
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon, box

from uhr.errors import SceneError, SceneWarning
from uhr.scenes.normalize import NormalizeConfig, Stretch, StretchMode, compute_stretch, to_rgb, valid_from_nodata
from uhr.scenes.source import fit_longest_side, paste_inside
from uhr.scenes.windows import Box
from uhr.storage import StorageConfig, is_remote, redact, to_gdal_path, uri_protocol

log = logging.getLogger(__name__)

_SUPPORTED_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"}
)
# Longest side above which a scene without overviews, or with a striped layout, gets a warning.
_WARN_SIDE = 2048
# A COG's tile index (8-byte offset + 8-byte size per tile) is read at open; 1M tiles = 16 MB.
_WARN_TILES = 1_000_000
_FOOTPRINT_POINTS_PER_EDGE = 16
# A decimated read that would decode more than this goes strip by strip (bounded memory).
_STRIP_BYTES = 32 * 1024 * 1024
# Lower-cased words of GDAL messages that tell a network failure or missing credentials from damage.
_NETWORK_WORDS = ("http", "curl", "connect", "timed out", "timeout", "could not resolve", "ssl")
_CREDENTIAL_WORDS = ("secret_access_key", "no_sign_request", "credentials")


def lonlat_polygon(lons: np.ndarray, lats: np.ndarray) -> Polygon | MultiPolygon:
    """The ring (lons, lats) in degrees as a valid polygon; one that crosses the antimeridian is
    split there into a MultiPolygon (RFC 7946 3.1.9) instead of wrapping round the globe."""
    # A step of more than 180 degrees between neighbours is the ring crossing +-180: unwrap it.
    steps = np.diff(lons, prepend=lons[0])
    unwrapped = lons - 360.0 * np.cumsum(np.round(steps / 360.0))
    ring = Polygon(zip(unwrapped, lats))
    west, _, east, _ = ring.bounds
    if west >= -180.0 and east <= 180.0:
        return ring
    shift = 360.0 if west < -180.0 else -360.0
    inside = ring.intersection(box(-180.0, -90.0, 180.0, 90.0))
    across = affinity.translate(ring.intersection(box(-180.0 - shift, -90.0, 180.0 - shift, 90.0)), xoff=shift)
    return MultiPolygon([inside, across])


class _MaskKind(Enum):
    """Where a scene's validity comes from (nodata values and NaN are always honoured)."""

    NONE = "none"
    ALPHA = "alpha"  # an alpha band: transparent pixels are invalid
    MASK = "mask"  # a GDAL mask band (internal or side-car .msk)


def open_scene(
    uri: str | os.PathLike[str],
    storage: StorageConfig | None = None,
    normalize: NormalizeConfig | None = None,
    stretch: Stretch | None = None,
) -> Scene:
    """Open the raster at `uri` (local path, `file://`, `s3://`, `gs://`, `https://` or a GDAL
    `/vsi...` path). Raises `SceneError` naming the URI and the reason when it cannot be read.

    `stretch`, the `Scene.stretch` another open of the same scene computed, spares this one the
    statistics read (a whole-scene view: every tile of a scene without overviews).
    """
    return Scene(uri, storage=storage, normalize=normalize, stretch=stretch)


class Scene:
    """An open raster scene serving RGB uint8 views and windows: a `PixelSource`.

    Attributes: `uri`, `width`, `height`, `count` (bands), `dtype`, `crs`, `transform`,
    `overviews` (decimation factors of the shown bands), `nodata`, `bands` (the 1-based bands
    shown as RGB or grey) and `footprint` (a shapely polygon in EPSG:4326, None when the scene
    is not georeferenced). Use as a context manager, or call `close()`.

    GDAL's dataset handle is not thread-safe: reads through one `Scene` take turns (a lock), so
    use one `Scene` per thread for parallel reads, and processes (Ray tasks) rather than threads,
    since GDAL can hold the GIL while it waits on the network.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        storage: StorageConfig | None = None,
        normalize: NormalizeConfig | None = None,
        stretch: Stretch | None = None,
    ):
        self.uri = os.fspath(uri)
        self.storage = storage if storage is not None else StorageConfig()
        self.normalize = normalize if normalize is not None else NormalizeConfig()
        self._gdal_env = self.storage.gdal_env()
        if not is_remote(self.uri) and "GDAL_DISABLE_READDIR_ON_OPEN" not in self.storage.gdal_options:
            # The object-store default hides side-car files; a local scene's `.msk`, `.ovr` and
            # `.aux.xml` are part of it and cost nothing to find.
            self._gdal_env["GDAL_DISABLE_READDIR_ON_OPEN"] = "FALSE"
        self._stretch: Stretch | None = stretch
        self._stretch_done = stretch is not None
        self._lock = threading.RLock()  # two threads reading one GDAL dataset crash the process
        try:
            path = to_gdal_path(self.uri)
        except ValueError as error:
            raise SceneError(self.uri, str(error)) from None
        # Inspecting runs under the scene's GDAL settings too: GDAL looks for side-car masks and
        # overviews when they are first asked for, and without the endpoint it would ask AWS.
        with self._gdal(opening=True):
            with warnings.catch_warnings():
                # Plain JPEG/PNG scenes are ungeoreferenced by nature; `footprint` is None for them.
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dataset = rasterio.open(path)
            try:
                self._inspect()
            except BaseException:
                self._dataset.close()
                raise

    def _inspect(self) -> None:
        dataset = self._dataset
        self.width: int = dataset.width
        self.height: int = dataset.height
        self.count: int = dataset.count
        if self.width <= 0 or self.height <= 0 or self.count <= 0:
            raise SceneError(self.uri, f"zero-sized raster ({self.width}x{self.height}, {self.count} bands)")
        self.bands: tuple[int, ...] = self._resolve_bands()
        dtypes = {dataset.dtypes[band - 1] for band in self.bands}
        if len(dtypes) != 1:
            raise SceneError(self.uri, f"unsupported layout: bands {self.bands} mix data types {sorted(dtypes)}")
        self.dtype: str = dtypes.pop()
        if self.dtype not in _SUPPORTED_DTYPES:
            raise SceneError(self.uri, f"unsupported layout: {self.dtype} data")
        self._palette = self._read_palette()
        self._mask_kind, self._alpha_band = self._resolve_mask()
        self.nodata: float | None = (
            self.normalize.nodata if self.normalize.nodata is not None else dataset.nodatavals[self.bands[0] - 1]
        )
        self.overviews: list[int] = dataset.overviews(self.bands[0])
        self.crs, self.transform = self._georeferencing()
        self.footprint: Polygon | MultiPolygon | None = self._footprint()
        self._box = Box(0, 0, self.width, self.height)
        self._warn_about_layout()

    def _resolve_bands(self) -> tuple[int, ...]:
        requested = self.normalize.bands
        if requested is not None:
            missing = [band for band in requested if band > self.count]
            if missing:
                raise SceneError(self.uri, f"bands {missing} requested, the scene has {self.count}")
            return requested
        interp = list(self._dataset.colorinterp)
        rgb = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        if all(colour in interp for colour in rgb):
            return tuple(interp.index(colour) + 1 for colour in rgb)
        # Multispectral products often mark their bands by description only ("blue", ..., "nir").
        names = [(name or "").strip().lower() for name in self._dataset.descriptions]
        if all(colour in names for colour in ("red", "green", "blue")):
            return tuple(names.index(colour) + 1 for colour in ("red", "green", "blue"))
        if self.count >= 3 and ColorInterp.alpha not in interp[:3]:
            if self.count > 3:
                # 4- and 8-band products are often in wavelength order (BGRN, coastal-blue-green-...):
                # bands 1-3 as RGB would swap or miss colours, which colour questions depend on.
                self._warn(
                    f"{self.count} bands, none marked red/green/blue (colour interpretation or description): "
                    "bands 1, 2, 3 shown as R, G, B; set normalize.bands, e.g. (3, 2, 1) for BGRN"
                )
            return (1, 2, 3)
        return (1,)

    def _read_palette(self) -> np.ndarray | None:
        band = self.bands[0]
        if len(self.bands) != 1 or self._dataset.colorinterp[band - 1] != ColorInterp.palette:
            return None
        if self.dtype not in ("uint8", "uint16"):
            raise SceneError(self.uri, f"unsupported layout: a palette over {self.dtype} data")
        colormap = self._dataset.colormap(band)
        palette = np.zeros((np.iinfo(self.dtype).max + 1, 4), dtype=np.uint8)
        for index, rgba in colormap.items():
            palette[index] = rgba
        return palette

    def _resolve_mask(self) -> tuple[_MaskKind, int | None]:
        flags = self._dataset.mask_flag_enums[self.bands[0] - 1]
        interp = list(self._dataset.colorinterp)
        # An alpha band by its colour interpretation: with a nodata value set too, GDAL reports the
        # nodata mask instead (`gdalwarp -dstalpha` writes such files), and nodata is applied anyway.
        if ColorInterp.alpha in interp and interp.index(ColorInterp.alpha) + 1 not in self.bands:
            return _MaskKind.ALPHA, interp.index(ColorInterp.alpha) + 1
        if MaskFlags.alpha in flags:
            return _MaskKind.MASK, None
        if MaskFlags.per_dataset in flags and MaskFlags.nodata not in flags:
            return _MaskKind.MASK, None
        # Nodata masks are recomputed from the values read: no second read of the same tiles.
        return _MaskKind.NONE, None

    def _georeferencing(self) -> tuple[CRS | None, Affine]:
        dataset = self._dataset
        if dataset.crs is not None and not dataset.transform.is_identity:
            return dataset.crs, dataset.transform
        gcps, gcp_crs = dataset.gcps
        if gcps and gcp_crs is not None:
            return gcp_crs, from_gcps(gcps)
        return dataset.crs, dataset.transform

    def _outline(self, rows: np.ndarray, cols: np.ndarray) -> tuple[CRS, np.ndarray, np.ndarray] | None:
        """(crs, xs, ys) of the pixel positions (rows, cols) by the scene's own georeferencing: its
        geotransform, else its GCPs or RPCs through GDAL's transformers (the affine fit `transform`
        of GCPs misses a warped outline by the fit's residual); None when it has none."""
        dataset = self._dataset
        if dataset.crs is not None and not dataset.transform.is_identity:
            xs, ys = dataset.transform @ (cols, rows)
            return dataset.crs, np.asarray(xs), np.asarray(ys)
        gcps, gcp_crs = dataset.gcps
        if gcps and gcp_crs is not None:
            with GCPTransformer(gcps) as transformer:
                xs, ys = transformer.xy(rows, cols, offset="ul")
            return gcp_crs, np.asarray(xs), np.asarray(ys)
        if dataset.rpcs is not None:
            # At the RPCs' mean height: without a DEM, the terrain height the model is centred on.
            with RPCTransformer(dataset.rpcs, RPC_HEIGHT=dataset.rpcs.height_off) as transformer:
                xs, ys = transformer.xy(rows, cols, offset="ul")
            return CRS.from_epsg(4326), np.asarray(xs), np.asarray(ys)
        return None

    def _footprint(self) -> Polygon | MultiPolygon | None:
        # The pixel-corner outline, densified so that curved edges in EPSG:4326 are followed.
        steps = np.linspace(0.0, 1.0, _FOOTPRINT_POINTS_PER_EDGE, endpoint=False)
        width, height = float(self.width), float(self.height)
        cols = np.concatenate([steps * width, np.full_like(steps, width), (1 - steps) * width, np.zeros_like(steps)])
        rows = np.concatenate([np.zeros_like(steps), steps * height, np.full_like(steps, height), (1 - steps) * height])
        # The pixels stay readable whatever happens here; only the index loses this scene's footprint.
        try:
            outline = self._outline(rows, cols)
            if outline is None:
                return None
            crs, xs, ys = outline
            lons, lats = transform_coords(crs, "EPSG:4326", xs.tolist(), ys.tolist())
        except (RasterioError, CPLE_BaseError) as error:
            self._warn(f"no footprint: cannot transform the outline to EPSG:4326 ({error})")
            return None
        lons, lats = np.asarray(lons), np.asarray(lats)
        if not (np.isfinite(lons).all() and np.isfinite(lats).all()):
            self._warn(f"no footprint: part of the outline has no longitude/latitude in {self.crs}")
            return None
        try:
            return lonlat_polygon(lons, lats)
        except GEOSException as error:  # an outline around a pole has no polygon in lon/lat
            self._warn(f"no footprint: the outline is no polygon in longitude/latitude ({error})")
            return None

    def _warn_about_layout(self) -> None:
        longest = max(self.width, self.height)
        if not self.overviews and longest > _WARN_SIDE:
            hint = "convert to a COG"
            if is_remote(self.uri) and self._gdal_env.get("GDAL_DISABLE_READDIR_ON_OPEN") == "EMPTY_DIR":
                hint += (
                    " (side-car .ovr and .msk files are not looked for in object stores; to use them, set "
                    "storage.gdal_options GDAL_DISABLE_READDIR_ON_OPEN=TRUE and add .ovr,.msk to "
                    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS)"
                )
            self._warn(
                f"{self.width}x{self.height} with no overviews: a coarse view decimates the full "
                f"resolution image strip by strip, reading and decoding every byte; {hint}"
            )
        block_height, block_width = self._dataset.block_shapes[self.bands[0] - 1]
        if block_width == self.width and longest > _WARN_SIDE:
            self._warn("striped (untiled) layout: every window reads whole image rows; convert to a COG")
        tiles = math.ceil(self.width / block_width) * math.ceil(self.height / block_height)
        if self._dataset.interleaving == Interleaving.band:
            tiles *= self.count
        if tiles > _WARN_TILES:
            self._warn(f"{tiles} tiles: the tile index (~{tiles * 16 // 2**20} MB) is read at open")

    def _warn(self, message: str) -> None:
        warnings.warn(f"{redact(self.uri)}: {message}", SceneWarning, stacklevel=6)

    @property
    def stretch(self) -> Stretch | None:
        """The value stretch every read of this scene uses; None when values are shown as stored.

        A percentile stretch is computed once, on first use, from the coarsest overview (or a
        view of `normalize.stats_max_side` when the scene has none that small), honouring
        nodata, masks and alpha.
        """
        with self._lock:
            if not self._stretch_done:
                self._stretch = self._compute_stretch()
                self._stretch_done = True
        return self._stretch

    def _compute_stretch(self) -> Stretch | None:
        mode = self.normalize.stretch
        if self._palette is not None or (mode is StretchMode.AUTO and self.dtype == "uint8"):
            return None
        if mode is StretchMode.FIXED:
            low, high = self.normalize.value_range
            return Stretch(low=(low,) * len(self.bands), high=(high,) * len(self.bands))
        out_width, out_height = self._stats_shape()
        data, valid = self._read_values(self._box, out_width, out_height, Resampling.nearest)
        return compute_stretch(data, valid, self.normalize.percentiles, self.normalize.per_band)

    def _stats_shape(self) -> tuple[int, int]:
        if self.overviews:
            # GDAL sizes an overview of factor f as ceil(size / f); asking for exactly that size
            # makes it read the coarsest overview as stored.
            factor = self.overviews[-1]
            width, height = math.ceil(self.width / factor), math.ceil(self.height / factor)
            if max(width, height) <= self.normalize.stats_max_side:
                return width, height
        longest = min(self.normalize.stats_max_side, max(self.width, self.height))
        return fit_longest_side(self.width, self.height, longest)

    def read_view(self, max_side: int) -> np.ndarray:
        """The whole scene as (H, W, 3) uint8, aspect kept, longest side exactly `max_side`.

        Served from the overview nearest above the requested resolution (area-averaged), or
        interpolated when `max_side` exceeds the scene.
        """
        width, height = fit_longest_side(self.width, self.height, max_side)
        return self.read_window(0, 0, self.width, self.height, out_size=(height, width))

    def read_window(
        self,
        col_off: int,
        row_off: int,
        width: int,
        height: int,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """A window as (height, width, 3) uint8, or (out_h, out_w, 3) when `out_size=(out_h, out_w)`.

        Parts past the scene's edge are zeros, never an error. With `out_size`, the window is
        area-averaged when shrinking (from overviews where they exist), interpolated when growing.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"window size must be positive, got {width}x{height}")
        out_height, out_width = (height, width) if out_size is None else out_size
        if out_width <= 0 or out_height <= 0:
            raise ValueError(f"out_size must be positive, got {out_size}")
        if self.closed:
            raise ValueError(f"read from a closed scene: {redact(self.uri)}")
        return paste_inside(Box(col_off, row_off, width, height), self._box, out_width, out_height, self._read_rgb)

    def _read_rgb(self, inside: Box, target: Box) -> np.ndarray:
        """The scene box `inside`, as RGB uint8 of `target`'s size."""
        stretch = self.stretch
        data, valid = self._read_values(inside, target.width, target.height, self._resampling(inside, target))
        return to_rgb(data, valid, stretch, self.normalize.fill, self._palette)

    def _resampling(self, source: Box, target: Box) -> Resampling:
        if self._palette is not None or (source.width == target.width and source.height == target.height):
            return Resampling.nearest
        if target.width <= source.width and target.height <= source.height:
            return Resampling.average
        return Resampling.bilinear

    def _read_values(
        self, box: Box, out_width: int, out_height: int, resampling: Resampling
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw values of the shown bands, (bands, out_height, out_width), and the validity mask.

        A decimation that would decode more than `_STRIP_BYTES` (no overview close enough to the
        requested resolution) is read as horizontal strips of whole output rows: GDAL then decodes
        each tile about once and memory stays bounded. Strip edges fall between source rows
        (floating-point windows), so the result equals a single read.
        """
        rows_per_strip = self._strip_rows(box, out_height)
        if rows_per_strip >= out_height:
            return self._read_window_values(
                Window(box.col_off, box.row_off, box.width, box.height), out_width, out_height, resampling
            )
        scale = box.height / out_height  # source rows per output row
        strips = [(first, min(first + rows_per_strip, out_height)) for first in range(0, out_height, rows_per_strip)]
        # Read bottom-up: a read that starts where GDAL's last download ended looks sequential to
        # /vsicurl, which then fetches far ahead, past the last strip into data no strip needs (a
        # 4032-px view of an 8192-px COG fetched 5.6 MB top-down, its 2.4-MB overview bottom-up).
        parts = [
            self._read_window_values(
                Window(box.col_off, box.row_off + first * scale, box.width, (last - first) * scale),
                out_width,
                last - first,
                resampling,
            )
            for first, last in reversed(strips)
        ][::-1]
        data = np.concatenate([part_data for part_data, _ in parts], axis=1)
        if all(part_valid is None for _, part_valid in parts):
            return data, None
        valid = np.concatenate(
            [np.ones(d.shape[1:], dtype=bool) if v is None else v for d, v in parts], axis=0
        )
        return data, valid

    def _strip_rows(self, box: Box, out_height: int) -> int:
        """Output rows per strip for reading `box` into `out_height` rows (>= out_height: one read)."""
        ratio = box.height / out_height
        # GDAL serves a decimation from the coarsest overview at least as fine as requested.
        factor = max((f for f in self.overviews if f <= ratio), default=1)
        itemsize = np.dtype(self.dtype).itemsize
        decoded_row = max(1, box.width // factor) * len(self.bands) * itemsize
        if decoded_row * (box.height // factor) <= _STRIP_BYTES:
            return out_height
        source_rows = max(1, _STRIP_BYTES // decoded_row) * factor
        return max(1, int(source_rows / ratio))

    def _read_window_values(
        self, window: Window, out_width: int, out_height: int, resampling: Resampling
    ) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock, self._gdal():
            data = self._dataset.read(
                list(self.bands),
                window=window,
                out_shape=(len(self.bands), out_height, out_width),
                resampling=resampling,
            )
            mask = None
            if self._mask_kind is _MaskKind.ALPHA:
                mask = self._dataset.read(
                    self._alpha_band, window=window, out_shape=(out_height, out_width), resampling=Resampling.nearest
                )
            elif self._mask_kind is _MaskKind.MASK:
                mask = self._dataset.read_masks(
                    self.bands[0], window=window, out_shape=(out_height, out_width), resampling=Resampling.nearest
                )
        valid = valid_from_nodata(data, self.nodata)
        if mask is not None:
            valid = mask > 0 if valid is None else valid & (mask > 0)
        return data, valid

    @contextmanager
    def _gdal(self, opening: bool = False) -> Iterator[None]:
        """GDAL configured for this scene's storage; GDAL errors become `SceneError`."""
        try:
            # DummySession: GDAL finds credentials itself (environment, profile, instance or pod
            # identity) instead of rasterio building a boto3 session on every call.
            with rasterio.Env(session=DummySession(), **self._gdal_env):
                yield
        except SceneError:
            raise
        except (RasterioError, CPLE_BaseError) as error:
            # `from None`: the GDAL exception's text may hold an unredacted signed URL.
            raise SceneError(self.uri, self._reason(error, opening)) from None

    def _reason(self, error: BaseException, opening: bool) -> str:
        message = _gdal_message(error)
        lowered = message.lower()
        network = any(word in lowered for word in _NETWORK_WORDS)
        if opening:
            found = self._probe()
            if found is not None:
                return found
            if "not recognized as" in message or "not recognised as" in message:
                return f"not a raster format GDAL can read ({message})"
            if any(word in lowered for word in _CREDENTIAL_WORDS):
                return f"no credentials for the object store ({message})"
            if network:
                return f"network error while opening ({message})"
            return f"corrupt or truncated header ({message})"
        if network:
            return f"network error while reading ({message})"
        if is_remote(self.uri) and "read error" in lowered:
            # A short read of an object: the connection dropped, or the object is truncated.
            return f"read failed: network error or truncated object ({message})"
        return f"corrupt or truncated raster data ({message})"

    def _probe(self) -> str | None:
        """Why an object GDAL could not open failed, when storage can tell; None otherwise."""
        if self.uri.startswith("/vsi"):
            return None
        web = uri_protocol(self.uri) in ("http", "https")
        try:
            info = self.storage.filesystem(self.uri).info(self.uri)
        except FileNotFoundError:
            # fsspec's HTTP filesystem says "not found" for any failed request (an expired signature's
            # 403 too): GDAL's own message, with the status code, is the better reason there.
            return None if web else "no such file or object"
        except PermissionError:
            return "access denied"
        except Exception as error:  # the probe only refines a message; GDAL's own stands otherwise
            log.debug("probing %s failed: %s", redact(self.uri), redact(str(error)))
            return None
        if info.get("type") == "directory":
            return "a directory, not a raster"
        if info.get("size") == 0:
            return "empty object (0 bytes)"
        allowed = str(self._gdal_env.get("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", ""))
        extensions = tuple(ext.strip().lower() for ext in allowed.split(",") if ext.strip())
        name = urlsplit(self.uri).path if web else self.uri  # a signed URL's query is not its name
        if is_remote(self.uri) and extensions and not name.lower().endswith(extensions):
            return (
                f"the name has none of the extensions GDAL may open remotely ({allowed}); "
                "set CPL_VSIL_CURL_ALLOWED_EXTENSIONS in StorageConfig.gdal_options"
            )
        return None

    @property
    def closed(self) -> bool:
        return self._dataset.closed

    def close(self) -> None:
        """Close the dataset handle."""
        self._dataset.close()

    def __enter__(self) -> Scene:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Scene({redact(self.uri)!r}, {self.width}x{self.height}, {self.count} bands, {self.dtype})"


# rasterio's wrappers that only point at the GDAL error chained below them.
_POINTERS = ("Read failed. See previous", "Read or write failed. See previous")


def _gdal_message(error: BaseException) -> str:
    """The messages of `error` and the GDAL errors chained under it, one line."""
    messages: list[str] = []
    current: BaseException | None = error
    while current is not None and len(messages) < 5:
        text = " ".join(str(current).split())
        repeated = any(text.rstrip(".") in seen for seen in messages)
        if text and not repeated and not text.startswith(_POINTERS):
            messages.append(text)
        current = current.__cause__ or current.__context__
    return "; ".join(messages) or type(error).__name__
