"""Seeded test rasters written by rasterio: COGs of each layout the scene reader must handle.

`pixels` makes deterministic content (smooth fields, sharp rectangles, fine texture) so that
windows, decimation and stretches have something to get right; `write_raster` writes it as a
COG (internal overviews by default) or as a plain GTiff, PNG or JPEG.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

CRS = "EPSG:32633"
# Upper-left corner of every georeferenced test raster, 0.5 m pixels.
ORIGIN = (500_000.0, 4_600_000.0)
PIXEL_SIZE = 0.5
TRANSFORM = from_origin(ORIGIN[0], ORIGIN[1], PIXEL_SIZE, PIXEL_SIZE)

# Value ranges per data type: what archives of each type typically hold.
_RANGES = {
    "uint8": (0.0, 255.0),
    "uint16": (200.0, 4200.0),  # scaled reflectance
    "int16": (-500.0, 3000.0),
    "float32": (0.0, 1.0),
}


def pixels(
    width: int, height: int, bands: int = 3, dtype: str = "uint8", seed: int = 0, texture: int = 64
) -> np.ndarray:
    """(bands, height, width) deterministic content of `dtype`, different in each band.

    A coarse random field (8-px cells) plus a fine texture of amplitude `texture` (< 256) and
    sharp rectangles; built in uint8 (fast enough for 8192^2), scaled to the type's usual range.
    """
    rng = np.random.default_rng(seed)
    # Large-scale field, upsampled by 8: the part overviews keep.
    coarse = rng.integers(0, 256 - texture, (bands, height // 8 + 1, width // 8 + 1), dtype=np.uint8)
    values = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :height, :width]
    # Fine texture from a repeated random tile: the part only full resolution has.
    tile = rng.integers(0, texture, (bands, 64, 64), dtype=np.uint8)
    values += np.tile(tile, (1, height // 64 + 1, width // 64 + 1))[:, :height, :width]
    # Sharp-edged rectangles ("objects").
    for _ in range(max(1, width * height // 40_000)):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size_x, size_y = int(rng.integers(2, 24)), int(rng.integers(2, 24))
        values[:, y0 : y0 + size_y, x0 : x0 + size_x] = rng.integers(0, 256, (bands, 1, 1), dtype=np.uint8)
    if dtype == "uint8":
        return values
    low, high = _RANGES[dtype]
    scaled = low + values.astype(np.float32) * np.float32((high - low) / 255.0)
    return scaled if dtype == "float32" else np.rint(scaled).astype(dtype)


def write_raster(
    path: str | Path,
    data: np.ndarray,
    *,
    driver: str = "COG",
    georeferenced: bool = True,
    nodata: float | None = None,
    overviews: bool = True,
    compress: str = "DEFLATE",
    blocksize: int = 256,
    quality: int = 90,
    colorinterp: list[ColorInterp] | None = None,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> Path:
    """Write (bands, H, W) `data` to `path` and return the path.

    COG: tiled `blocksize`, internal overviews (average-resampled) unless `overviews` is False.
    GTiff: striped, no overviews. PNG/JPEG: plain image files.
    """
    path = Path(path)
    bands, height, width = data.shape
    profile: dict = {"driver": driver, "width": width, "height": height, "count": bands, "dtype": data.dtype.name}
    if georeferenced:
        profile.update(crs=CRS, transform=TRANSFORM)
    if nodata is not None:
        profile["nodata"] = nodata
    if driver == "COG":
        profile.update(
            BLOCKSIZE=blocksize,
            COMPRESS=compress,
            OVERVIEWS="AUTO" if overviews else "NONE",
            OVERVIEW_RESAMPLING="AVERAGE",
        )
        if compress == "JPEG":
            profile["QUALITY"] = quality
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dataset:
            dataset.write(data)
            if colorinterp is not None:
                dataset.colorinterp = colorinterp
            if colormap is not None:
                dataset.write_colormap(1, colormap)
    return path
