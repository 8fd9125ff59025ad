"""Normalisation of what archives hold to RGB uint8: band mapping, stretch, nodata and masks.

Pure array code: the reader hands over raster values (bands, H, W) and a validity mask; this module
turns them into (H, W, 3) uint8. The per-scene stretch is computed once, from the scene's coarsest
overview, and applied to every read of that scene so that its tiles agree with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class StretchMode(str, Enum):
    """How raster values become 0..255."""

    AUTO = "auto"  # uint8 and paletted data as stored; other types: PERCENTILE
    PERCENTILE = "percentile"  # per-scene percentiles of the coarsest overview
    FIXED = "fixed"  # one `value_range` for every scene (consistent across an archive)


class NormalizeConfig(BaseModel):
    """How a scene's bands and values map to RGB uint8."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    bands: tuple[int, ...] | None = Field(
        default=None,
        description="1-based bands to show: one (grey) or three (R, G, B), e.g. (4, 3, 2) for "
        "false colour. None: the bands whose colour interpretation is red/green/blue, else the "
        "first three, else band 1 as grey.",
    )
    stretch: StretchMode = Field(default=StretchMode.AUTO, description="How values map to 0..255.")
    percentiles: tuple[float, float] = Field(
        default=(2.0, 98.0), description="Low and high percentiles mapped to 0 and 255 (PERCENTILE)."
    )
    per_band: bool = Field(
        default=False,
        description="Stretch each band on its own. False stretches the bands jointly, which keeps "
        "colours (hue) as stored: what colour questions need.",
    )
    value_range: tuple[float, float] | None = Field(
        default=None, description="Values mapped to 0 and 255 when stretch is FIXED, e.g. (0, 3000)."
    )
    nodata: float | None = Field(
        default=None,
        description="Nodata value overriding the scene's own. GDAL does not know it, so decimated "
        "reads may average it into the pixels bordering nodata areas.",
    )
    fill: int = Field(default=0, ge=0, le=255, description="Value of nodata and masked pixels.")
    stats_max_side: int = Field(
        default=1024,
        gt=0,
        description="Longest side of the view the stretch is computed from when the scene has no "
        "overview that small.",
    )

    @model_validator(mode="after")
    def _check(self) -> NormalizeConfig:
        if self.bands is not None:
            if len(self.bands) not in (1, 3):
                raise ValueError(f"bands must name one band (grey) or three (RGB), got {self.bands}")
            if min(self.bands) < 1:
                raise ValueError(f"bands are 1-based, got {self.bands}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.stretch is StretchMode.FIXED:
            if self.value_range is None:
                raise ValueError("stretch 'fixed' needs value_range")
            if not self.value_range[0] < self.value_range[1]:
                raise ValueError(f"value_range must be (low, high) with low < high, got {self.value_range}")
        return self


@dataclass(frozen=True)
class Stretch:
    """A linear map per band: `low` -> 0, `high` -> 255, clipped; one entry per shown band."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """(bands, H, W) values -> (bands, H, W) uint8."""
        low = np.asarray(self.low, dtype=np.float32)[:, None, None]
        span = np.asarray(self.high, dtype=np.float32)[:, None, None] - low
        # A constant band (span 0) maps to 0 rather than dividing by zero.
        scale = np.divide(255.0, span, out=np.zeros_like(span), where=span > 0)
        # float32 in place: a large window stays at 4 bytes a value.
        out = data.astype(np.float32)
        out -= low
        out *= scale
        # NaN (nodata in float scenes, masked by the caller) becomes 0 instead of an invalid cast.
        np.nan_to_num(out, copy=False, nan=0.0)
        np.clip(out, 0.0, 255.0, out=out)
        return np.rint(out, out=out).astype(np.uint8)


def compute_stretch(
    data: np.ndarray, valid: np.ndarray | None, percentiles: Sequence[float], per_band: bool
) -> Stretch:
    """The percentile stretch of (bands, H, W) `data` over its valid, finite pixels.

    `valid` is an (H, W) bool mask or None (all valid). With `per_band` False, every band gets
    the percentiles of all bands' values pooled. No valid pixel gives the identity on 0..255.
    """
    bands = data.shape[0]
    values = data.reshape(bands, -1) if valid is None else data[:, valid]
    finite = np.isfinite(values).all(axis=0) if np.issubdtype(values.dtype, np.floating) else None
    if finite is not None:
        values = values[:, finite]
    if values.shape[1] == 0:
        return Stretch(low=(0.0,) * bands, high=(255.0,) * bands)
    if per_band:
        low, high = np.percentile(values, percentiles, axis=1)
        return Stretch(low=tuple(map(float, low)), high=tuple(map(float, high)))
    low, high = np.percentile(values, percentiles)
    return Stretch(low=(float(low),) * bands, high=(float(high),) * bands)


def valid_from_nodata(data: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """(H, W) mask of pixels that hold data: not every band equal to `nodata`, and all finite.

    None when every pixel is valid (nodata None and integer data).
    """
    valid = None
    if nodata is not None:
        is_nodata = np.isnan(data) if np.isnan(nodata) else data == nodata
        valid = ~is_nodata.all(axis=0)
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data).all(axis=0)
        valid = finite if valid is None else valid & finite
    return valid


def to_rgb(
    data: np.ndarray,
    valid: np.ndarray | None,
    stretch: Stretch | None,
    fill: int,
    palette: np.ndarray | None = None,
) -> np.ndarray:
    """(bands, H, W) raster values -> (H, W, 3) uint8.

    One band is grey (or palette indices when `palette`, an (N, 4) RGBA lookup table, is given;
    palette entries with alpha 0 count as masked); three bands are R, G, B. Values pass through
    `stretch`, or must already be uint8 when it is None. Pixels where `valid` is False get `fill`.
    """
    if data.ndim != 3 or data.shape[0] not in (1, 3):
        raise ValueError(f"expected (1 or 3, H, W) values, got shape {data.shape}")
    if palette is not None:
        rgba = palette[data[0]]  # (H, W, 4)
        opaque = rgba[..., 3] > 0
        valid = opaque if valid is None else valid & opaque
        rgb = np.ascontiguousarray(rgba[..., :3])
    else:
        if stretch is not None:
            data = stretch.apply(data)
        elif data.dtype != np.uint8:
            raise ValueError(f"{data.dtype} values need a stretch to become uint8")
        rgb = np.repeat(data, 3, axis=0) if data.shape[0] == 1 else data
        rgb = np.ascontiguousarray(rgb.transpose(1, 2, 0))  # (3, H, W) -> (H, W, 3)
    if valid is not None:
        rgb[~valid] = fill
    return rgb
