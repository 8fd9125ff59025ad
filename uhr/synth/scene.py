"""One synthetic scene: its ground truth, its pixels by window, and its Cloud-Optimized GeoTIFF.

`plan_scene` decides everything about a scene from (size, seed, options) without touching a pixel:
georeferencing, land-cover layout, objects. `render_window` draws any window of it. `write_scene`
renders block by block into a tiled staging GeoTIFF, builds its overviews, and has GDAL's COG
driver copy it into the final file (IFDs first, overviews inside), so memory stays bounded by the
block size however large the scene is.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.windows import Window

from uhr.storage import StorageConfig, is_remote, redact, uri_protocol
from uhr.synth.landcover import LandCoverLayout, render_background
from uhr.synth.objects import SceneObject, paint, place_objects

if TYPE_CHECKING:
    from collections.abc import Iterator

MIN_SIDE = 128
MAX_SIDE = 65536
TILE_PX = 512
# uint16 scenes hold `offset + gain * level` for 8-bit display levels: 12-bit-like radiometry
# that a reader must stretch, as it must for real sensor data.
UINT16_OFFSET = 150.0
UINT16_GAIN = 10.0
# GDAL block cache while writing (MB). Blocks are written once, in order; GDAL's default (5% of
# RAM) would dominate peak memory.
WRITE_CACHE_MB = 32
JPEG_QUALITY = 90
# Seed streams, so georeferencing, layout and objects do not shift when one of them changes.
_GEO_STREAM, _LAYOUT_STREAM, _OBJECT_STREAM = 0, 1, 2

_BANDS: dict[int, tuple[tuple[str, ...], tuple[ColorInterp, ...]]] = {
    1: (("pan",), (ColorInterp.gray,)),
    3: (("red", "green", "blue"), (ColorInterp.red, ColorInterp.green, ColorInterp.blue)),
    # NIR is undefined, not alpha: a reader must not treat it as a mask.
    4: (("red", "green", "blue", "nir"), (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined)),
}
_DTYPES = ("uint8", "uint16")


class Compression(str, Enum):
    """COG compression: lossless DEFLATE (any output) or JPEG (uint8, 1 or 3 bands)."""

    DEFLATE = "deflate"
    JPEG = "jpeg"


@dataclass
class SceneTruth:
    """Everything a synthetic scene holds, in scene pixels: the answer key of its questions."""

    width: int
    height: int
    seed: int
    crs: str
    transform: tuple[float, float, float, float, float, float]
    dtype: str
    bands: int
    landcover: LandCoverLayout
    landcover_fractions: dict[str, float]
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width, self.height

    @property
    def pixel_size_m(self) -> float:
        return abs(self.transform[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": [self.width, self.height],
            "seed": self.seed,
            "crs": self.crs,
            "transform": list(self.transform),
            "pixel_size_m": self.pixel_size_m,
            "dtype": self.dtype,
            "bands": self.bands,
            "value_scale": _value_scale(self.dtype),
            "landcover": self.landcover.to_dict(),
            "landcover_fractions": dict(self.landcover_fractions),
            "objects": [obj.to_dict() for obj in self.objects],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneTruth:
        width, height = (int(v) for v in data["size"])
        return cls(
            width=width,
            height=height,
            seed=int(data["seed"]),
            crs=str(data["crs"]),
            transform=tuple(float(v) for v in data["transform"]),  # type: ignore[arg-type]
            dtype=str(data["dtype"]),
            bands=int(data["bands"]),
            landcover=LandCoverLayout.from_dict(data["landcover"]),
            landcover_fractions={str(k): float(v) for k, v in data["landcover_fractions"].items()},
            objects=[SceneObject.from_dict(obj) for obj in data["objects"]],
        )


def _value_scale(dtype: str) -> dict[str, float]:
    """How stored values relate to 8-bit display levels: value = offset + gain * level."""
    if dtype == "uint16":
        return {"offset": UINT16_OFFSET, "gain": UINT16_GAIN}
    return {"offset": 0.0, "gain": 1.0}


def _check_options(size: int | tuple[int, int], seed: int, dtype: str, bands: int) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, (int, np.integer)) or not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"scene {name} must be an integer in [{MIN_SIDE}, {MAX_SIDE}], got {side!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if bands not in _BANDS:
        raise ValueError(f"bands must be one of {tuple(_BANDS)}, got {bands!r}")
    return int(width), int(height)


def plan_scene(size: int | tuple[int, int], seed: int, *, dtype: str = "uint8", bands: int = 3) -> SceneTruth:
    """The ground truth of the scene `write_scene` would write, without rendering a pixel.

    `size` is the side of a square scene or (width, height). Georeferencing: a UTM zone of the
    northern hemisphere (EPSG:32631-32636), 0.3-1.0 m pixels, a plausible top-left corner.
    """
    width, height = _check_options(size, seed, dtype, bands)
    geo = np.random.default_rng(np.random.SeedSequence([seed, _GEO_STREAM]))
    zone = int(geo.integers(31, 37))
    pixel = round(float(geo.uniform(0.3, 1.0)), 2)
    east = float(round(geo.uniform(200_000, 800_000 - width * pixel)))
    north = float(round(geo.uniform(4_000_000, 6_500_000)))
    layout = LandCoverLayout.generate(width, height, np.random.default_rng(np.random.SeedSequence([seed, _LAYOUT_STREAM])))
    # About a million samples at most; a multiple of the label cell so each sample is one cell.
    stride = layout.cell * max(1, math.ceil(max(width, height) / 1024 / layout.cell))
    fractions = layout.fractions(stride)
    objects = place_objects(layout, fractions, np.random.default_rng(np.random.SeedSequence([seed, _OBJECT_STREAM])))
    return SceneTruth(
        width=width,
        height=height,
        seed=int(seed),
        crs=f"EPSG:{32600 + zone}",
        transform=(pixel, 0.0, east, 0.0, -pixel, north),
        dtype=dtype,
        bands=bands,
        landcover=layout,
        landcover_fractions=fractions,
        objects=objects,
    )


def render_window(truth: SceneTruth, col_off: int, row_off: int, width: int, height: int) -> np.ndarray:
    """Pixels of a window inside the scene as stored: (bands, height, width) of the scene's dtype."""
    if col_off < 0 or row_off < 0 or col_off + width > truth.width or row_off + height > truth.height:
        raise ValueError(
            f"window {col_off},{row_off} {width}x{height} is not inside the {truth.width}x{truth.height} scene"
        )
    labels = truth.landcover.labels(col_off, row_off, width, height)
    rgb, nir = render_background(truth.landcover, col_off, row_off, width, height, labels, nir=truth.bands == 4)
    window = (col_off, row_off, col_off + width, row_off + height)
    paint(_objects_meeting(truth, window), window, rgb, nir)
    if truth.bands == 1:
        # Panchromatic as luminance (ITU-R BT.601 weights).
        planes = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])[None]
    else:
        planes = np.moveaxis(rgb, -1, 0)
        if truth.bands == 4:
            planes = np.concatenate([planes, nir[None]])
    scale = _value_scale(truth.dtype)
    info = np.iinfo(truth.dtype)
    values = np.rint(scale["offset"] + scale["gain"] * planes) if truth.dtype != "uint8" else np.rint(planes)
    return np.clip(values, info.min, info.max).astype(truth.dtype)


def _objects_meeting(truth: SceneTruth, window: tuple[int, int, int, int]) -> list[SceneObject]:
    if not truth.objects:
        return []
    boxes = np.asarray([obj.bbox for obj in truth.objects])
    meets = (boxes[:, 0] < window[2]) & (boxes[:, 2] > window[0]) & (boxes[:, 1] < window[3]) & (boxes[:, 3] > window[1])
    return [truth.objects[i] for i in np.flatnonzero(meets)]


def overview_factors(width: int, height: int, tile: int = TILE_PX) -> list[int]:
    """Decimation factors 2, 4, 8, ... until the smallest overview's longest side is below `tile`."""
    factors: list[int] = []
    factor = 1
    while math.ceil(max(width, height) / factor) >= tile:
        factor *= 2
        factors.append(factor)
    return factors


def write_scene(
    uri: str,
    size: int | tuple[int, int],
    seed: int,
    *,
    dtype: str = "uint8",
    bands: int = 3,
    storage: StorageConfig | None = None,
    compress: Compression | str = Compression.DEFLATE,
    block_size: int = 512,
) -> SceneTruth:
    """Write one deterministic synthetic scene as a COG at `uri` (a local path or s3://...).

    The same (size, seed, dtype, bands, compress) always gives the same pixels and truth.
    `size` is the side of a square scene or (width, height); `dtype` "uint8" or "uint16";
    `bands` 1 (pan), 3 (RGB) or 4 (RGB + NIR). DEFLATE keeps every pixel exact; JPEG (uint8,
    1 or 3 bands) gives archive-like files a tenth the size. Pixels are rendered in blocks of
    `block_size` px (a multiple of 512), which bounds memory; the block size never changes them.
    Remote URIs are written to a local temporary file, then uploaded with `storage`'s filesystem.
    Returns the scene's ground truth.
    """
    if compress not in {c.value for c in Compression}:
        raise ValueError(f"compress must be one of {[c.value for c in Compression]}, got {compress!r}")
    compression = Compression(compress)
    if compression is Compression.JPEG and (dtype != "uint8" or bands == 4):
        raise ValueError(f"JPEG compression needs uint8 with 1 or 3 bands, got {dtype} with {bands} bands")
    if block_size <= 0 or block_size % TILE_PX:
        raise ValueError(f"block_size must be a positive multiple of {TILE_PX}, got {block_size}")
    if uri.startswith("/vsi"):
        raise ValueError(f"write scenes to a path or an s3:// URI, not a GDAL path: {redact(uri)}")
    truth = plan_scene(size, seed, dtype=dtype, bands=bands)
    if is_remote(uri):
        filesystem = (storage or StorageConfig()).filesystem(uri)
        with tempfile.TemporaryDirectory(prefix="uhr-synth-") as workdir:
            local = os.path.join(workdir, "scene.tif")
            _write_cog(truth, local, compression, block_size, workdir)
            filesystem.put_file(local, uri)
        return truth
    if uri_protocol(uri) not in (None, "file", "local"):
        raise ValueError(f"cannot write a scene to {redact(uri)}: not a local path or an object-store URI")
    path = os.path.abspath(uri.split("://", 1)[1] if "://" in uri else uri)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Staged beside the target and renamed into place: a reader never sees a half-written scene.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".uhr-synth-") as workdir:
        local = os.path.join(workdir, "scene.tif")
        _write_cog(truth, local, compression, block_size, workdir)
        os.replace(local, path)
    return truth


def _blocks(width: int, height: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield col, row, min(block, width - col), min(block, height - row)


def _write_cog(truth: SceneTruth, path: str, compression: Compression, block_size: int, workdir: str) -> None:
    staging = os.path.join(workdir, "staging.tif")
    descriptions, colorinterp = _BANDS[truth.bands]
    factors = overview_factors(truth.width, truth.height)
    with rasterio.Env(GDAL_CACHEMAX=WRITE_CACHE_MB * 2**20, GDAL_NUM_THREADS="ALL_CPUS"):
        with rasterio.open(
            staging,
            "w",
            driver="GTiff",
            width=truth.width,
            height=truth.height,
            count=truth.bands,
            dtype=truth.dtype,
            crs=truth.crs,
            transform=Affine(*truth.transform),
            tiled=True,
            blockxsize=TILE_PX,
            blockysize=TILE_PX,
            interleave="pixel",
            photometric="RGB" if truth.bands in (3, 4) else "MINISBLACK",
            # Uncompressed staging is fastest to write and to read back; it can pass 4 GiB.
            BIGTIFF="YES",
        ) as staged:
            staged.colorinterp = colorinterp
            for band, description in enumerate(descriptions, start=1):
                staged.set_band_description(band, description)
            for col, row, width, height in _blocks(truth.width, truth.height, block_size):
                staged.write(render_window(truth, col, row, width, height), window=Window(col, row, width, height))
            if factors:
                staged.build_overviews(factors, Resampling.average)
        options: dict[str, Any] = {
            "BLOCKSIZE": TILE_PX,
            "BIGTIFF": "IF_SAFER",
            "NUM_THREADS": "ALL_CPUS",
            "OVERVIEWS": "FORCE_USE_EXISTING" if factors else "NONE",
        }
        if compression is Compression.JPEG:
            options.update(COMPRESS="JPEG", QUALITY=JPEG_QUALITY)
        else:
            options.update(COMPRESS="DEFLATE", PREDICTOR="YES")
        rasterio.shutil.copy(staging, path, driver="COG", **options)
