"""Land cover of a synthetic scene: a warped Voronoi layout of five classes and their textures.

The layout is a jittered lattice of sites, each with a class; a pixel takes the class of the
nearest site after its coordinates are displaced by smooth noise, which turns the straight Voronoi
edges into shorelines and field margins. Classes are decided on a grid of `cell` x `cell` pixel
cells, so one small function answers "which class is here?" for the renderer, for object
placement and for the questions alike, and all three agree exactly.

Textures are functions of absolute pixel coordinates (see `uhr.synth.noise`): water with slow
swell, forest canopy, farmland parcels with crop rows, an urban road grid with roofs, bare soil.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from enum import Enum
from typing import Any

import numpy as np

from uhr.synth.noise import fbm_grid, grain, hash32, uniform, value_noise_grid, value_noise_points


class LandCover(str, Enum):
    """Land-cover classes; the position in `LAND_COVERS` is the label code."""

    WATER = "water"
    FOREST = "forest"
    FARMLAND = "farmland"
    URBAN = "urban"
    BARE_SOIL = "bare soil"


LAND_COVERS: tuple[LandCover, ...] = tuple(LandCover)
LABEL: dict[LandCover, int] = {cover: code for code, cover in enumerate(LAND_COVERS)}

# Share of sites per class once every class has one site.
SITE_WEIGHTS: dict[LandCover, float] = {
    LandCover.WATER: 0.2,
    LandCover.FOREST: 0.25,
    LandCover.FARMLAND: 0.25,
    LandCover.URBAN: 0.15,
    LandCover.BARE_SOIL: 0.15,
}

# Near infrared as `a * mean(RGB) + b`: vegetation bright, water dark (what NDVI expects).
NIR_FROM_RGB: dict[LandCover, tuple[float, float]] = {
    LandCover.WATER: (0.15, 4.0),
    LandCover.FOREST: (1.3, 95.0),
    LandCover.FARMLAND: (1.0, 85.0),
    LandCover.URBAN: (0.9, 10.0),
    LandCover.BARE_SOIL: (0.95, 25.0),
}

# Label grid cell in pixels; class boundaries are staircases of this step.
CELL_PX = 4
# Urban geometry (pixels): roads on a square lattice, two lanes each, blocks of 2 x 2 lots.
ROAD_PERIOD_PX = 160
ROAD_WIDTH_PX = 16
SIDEWALK_PX = 4
LOT_GAP_PX = 3
# Farmland parcels (pixels): columns of parcels, each column with its own vertical offset.
PARCEL_WIDTH_PX = 232
PARCEL_HEIGHT_PX = 168
HEDGE_PX = 3

ROAD_RGB = (78.0, 80.0, 84.0)
SIDEWALK_RGB = (148.0, 146.0, 140.0)
ROOF_RGB = np.array(
    [(118, 118, 124), (150, 96, 78), (168, 164, 154), (96, 92, 88), (132, 112, 92), (104, 112, 120)],
    dtype=np.float32,
)
PARK_RGB = (70.0, 104.0, 58.0)
CROP_RGB = np.array(
    [(116, 146, 62), (168, 158, 84), (138, 110, 74), (98, 128, 52), (186, 172, 112), (128, 138, 70)],
    dtype=np.float32,
)
HEDGE_RGB = (66.0, 86.0, 48.0)
WATER_RGB = (22.0, 58.0, 84.0)
FOREST_RGB = (38.0, 72.0, 36.0)
SOIL_RGB = (168.0, 138.0, 102.0)
# Sensor grain amplitude in 8-bit levels.
GRAIN_DN = 3.0


@dataclass(frozen=True)
class LandCoverLayout:
    """Where each land-cover class lies in one scene, and the seeds of its textures.

    Sites sit on a lattice of `spacing` px with one ring of cells outside the scene; `site_x`,
    `site_y` and `site_class` are indexed [row + 1][col + 1] of that lattice. Coordinates are
    displaced by up to `warp_px` of smooth noise (lattice `warp_scale_px`) before the nearest of
    the 3 x 3 neighbouring sites is taken, per `cell` x `cell` pixel cell.
    """

    width: int
    height: int
    seed: int
    spacing: float
    warp_px: float
    warp_scale_px: float
    site_x: tuple[tuple[float, ...], ...]
    site_y: tuple[tuple[float, ...], ...]
    site_class: tuple[tuple[int, ...], ...]
    road_offset: tuple[int, int]
    cell: int = CELL_PX

    @classmethod
    def generate(cls, width: int, height: int, rng: np.random.Generator) -> LandCoverLayout:
        """A random layout: about 4-5 sites across the shorter side, at least 256 px apart."""
        spacing = float(max(256.0, min(width, height) / 4.5))
        cols = math.ceil(width / spacing) + 2
        rows = math.ceil(height / spacing) + 2
        # Sites stay in the middle 70% of their cell, so the 3 x 3 search rarely misses one.
        jitter = rng.uniform(-0.35, 0.35, size=(2, rows, cols))
        site_x = (np.arange(cols)[None, :] - 1 + 0.5 + jitter[0]) * spacing
        site_y = (np.arange(rows)[:, None] - 1 + 0.5 + jitter[1]) * spacing
        classes = _assign_classes(rows, cols, width, height, site_x, site_y, rng)
        return cls(
            width=width,
            height=height,
            seed=int(rng.integers(0, 2**31 - 1)),
            spacing=spacing,
            warp_px=0.3 * spacing,
            warp_scale_px=0.6 * spacing,
            site_x=_rounded(site_x),
            site_y=_rounded(site_y),
            site_class=tuple(tuple(int(c) for c in row) for row in classes),
            road_offset=(int(rng.integers(0, ROAD_PERIOD_PX)), int(rng.integers(0, ROAD_PERIOD_PX))),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "spacing": self.spacing,
            "warp_px": self.warp_px,
            "warp_scale_px": self.warp_scale_px,
            "cell": self.cell,
            "classes": [cover.value for cover in LAND_COVERS],
            "site_x": [list(row) for row in self.site_x],
            "site_y": [list(row) for row in self.site_y],
            "site_class": [list(row) for row in self.site_class],
            "road_offset": list(self.road_offset),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LandCoverLayout:
        classes = [LandCover(name) for name in data["classes"]]
        if classes != list(LAND_COVERS):
            raise ValueError(f"land-cover classes {data['classes']} differ from this version's {LAND_COVERS}")
        return cls(
            width=int(data["width"]),
            height=int(data["height"]),
            seed=int(data["seed"]),
            spacing=float(data["spacing"]),
            warp_px=float(data["warp_px"]),
            warp_scale_px=float(data["warp_scale_px"]),
            site_x=tuple(tuple(float(v) for v in row) for row in data["site_x"]),
            site_y=tuple(tuple(float(v) for v in row) for row in data["site_y"]),
            site_class=tuple(tuple(int(v) for v in row) for row in data["site_class"]),
            road_offset=(int(data["road_offset"][0]), int(data["road_offset"][1])),
            cell=int(data["cell"]),
        )

    def labels_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Label codes (index into LAND_COVERS) at pixel coordinates x, y (broadcast together)."""
        cx = np.floor(np.asarray(x, dtype=np.float64) / self.cell)
        cy = np.floor(np.asarray(y, dtype=np.float64) / self.cell)
        return self._cell_labels(cx, cy)

    def labels(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Label codes of every pixel of a window, (height, width) uint8."""
        c = self.cell
        cx0, cy0 = x0 // c, y0 // c
        cx = np.arange(cx0, (x0 + width - 1) // c + 1, dtype=np.float64)
        cy = np.arange(cy0, (y0 + height - 1) // c + 1, dtype=np.float64)
        cells = self._cell_labels(cx[None, :], cy[:, None])
        full = np.repeat(np.repeat(cells, c, axis=0), c, axis=1)
        return full[y0 - cy0 * c : y0 - cy0 * c + height, x0 - cx0 * c : x0 - cx0 * c + width]

    def fractions(self, stride: int) -> dict[str, float]:
        """Share of the scene per class, sampled at cell centres every `stride` px (a multiple of `cell`)."""
        xs = np.arange(stride // 2, self.width, stride, dtype=np.float64)
        ys = np.arange(stride // 2, self.height, stride, dtype=np.float64)
        counts = np.zeros(len(LAND_COVERS), dtype=np.int64)
        for row in range(0, len(ys), 256):
            counts += np.bincount(self.labels_at(xs[None, :], ys[row : row + 256, None]).ravel(), minlength=len(counts))
        return {cover.value: float(n / counts.sum()) for cover, n in zip(LAND_COVERS, counts)}

    def road_mask(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Pixels of the urban road lattice in a window, (height, width) bool (urban or not)."""
        on_x = (np.arange(x0, x0 + width) - self.road_offset[0]) % ROAD_PERIOD_PX < ROAD_WIDTH_PX
        on_y = (np.arange(y0, y0 + height) - self.road_offset[1]) % ROAD_PERIOD_PX < ROAD_WIDTH_PX
        return on_x[None, :] | on_y[:, None]

    @cached_property
    def _sites(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.asarray(self.site_x), np.asarray(self.site_y), np.asarray(self.site_class, dtype=np.uint8)

    def _cell_labels(self, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        # Cell centres, displaced by two octaves of smooth noise, then the nearest of 3 x 3 sites.
        px = (cx + 0.5) * self.cell
        py = (cy + 0.5) * self.cell
        dx = self._warp(px, py, 1)
        dy = self._warp(px, py, 2)
        wx = px + dx
        wy = py + dy
        site_x, site_y, site_class = self._sites
        rows, cols = site_class.shape
        col = np.floor(wx / self.spacing).astype(np.int64) + 1
        row = np.floor(wy / self.spacing).astype(np.int64) + 1
        best = np.full(np.broadcast_shapes(wx.shape, wy.shape), np.inf)
        label = np.zeros(best.shape, dtype=np.uint8)
        for drow in (-1, 0, 1):
            r = np.clip(row + drow, 0, rows - 1)
            for dcol in (-1, 0, 1):
                c = np.clip(col + dcol, 0, cols - 1)
                d2 = (site_x[r, c] - wx) ** 2 + (site_y[r, c] - wy) ** 2
                closer = d2 < best
                best = np.where(closer, d2, best)
                label = np.where(closer, site_class[r, c], label)
        return label

    def _warp(self, px: np.ndarray, py: np.ndarray, stream: int) -> np.ndarray:
        coarse = value_noise_points(px, py, self.warp_scale_px, self.seed + stream)
        fine = value_noise_points(px, py, self.warp_scale_px / 5.0, self.seed + 10 + stream)
        return self.warp_px * ((coarse - 0.5) * 2.0 + 0.3 * (fine - 0.5) * 2.0)


def _rounded(values: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(round(float(v), 2) for v in row) for row in values)


def _assign_classes(
    rows: int,
    cols: int,
    width: int,
    height: int,
    site_x: np.ndarray,
    site_y: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Classes per site: every class on at least one site inside the scene, the rest by weight."""
    weights = np.array([SITE_WEIGHTS[cover] for cover in LAND_COVERS])
    classes = rng.choice(len(LAND_COVERS), size=(rows, cols), p=weights / weights.sum())
    inside = np.flatnonzero(((site_x >= 0) & (site_x < width) & (site_y >= 0) & (site_y < height)).ravel())
    chosen = rng.permutation(inside)[: len(LAND_COVERS)]
    flat = classes.ravel()
    flat[chosen] = rng.permutation(len(LAND_COVERS))[: len(chosen)]
    return flat.reshape(rows, cols)


def render_background(
    layout: LandCoverLayout, x0: int, y0: int, width: int, height: int, labels: np.ndarray, *, nir: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Textured land cover of a window: RGB (height, width, 3) and, if asked, NIR (height, width).

    Float32 on the 0-255 scale of 8-bit display levels. Each class present is textured only over
    the rows and columns where it occurs.
    """
    rgb = np.empty((height, width, 3), dtype=np.float32)
    infrared = np.empty((height, width), dtype=np.float32) if nir else None
    codes = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(LAND_COVERS)))
    for code in codes:
        cover = LAND_COVERS[code]
        where = labels == code
        if len(codes) == 1:
            rows, cols = slice(0, height), slice(0, width)
        else:
            row_hits = np.flatnonzero(where.any(axis=1))
            col_hits = np.flatnonzero(where.any(axis=0))
            rows = slice(int(row_hits[0]), int(row_hits[-1]) + 1)
            cols = slice(int(col_hits[0]), int(col_hits[-1]) + 1)
        texture = _TEXTURES[cover](layout, x0 + cols.start, y0 + rows.start, cols.stop - cols.start, rows.stop - rows.start)
        inside = where[rows, cols]
        np.copyto(rgb[rows, cols], texture, where=inside[..., None])
        if infrared is not None:
            slope, intercept = NIR_FROM_RGB[cover]
            texture_nir = (slope / 3.0) * (texture[..., 0] + texture[..., 1] + texture[..., 2]) + intercept
            np.copyto(infrared[rows, cols], texture_nir, where=inside)
    noise = GRAIN_DN * grain(x0, y0, width, height, layout.seed + 99)
    rgb += noise[..., None]
    if infrared is not None:
        infrared += noise
    return rgb, infrared


def _shade(base: tuple[float, float, float], factor: np.ndarray) -> np.ndarray:
    return factor[..., None] * np.asarray(base, dtype=np.float32)


def _water(layout: LandCoverLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    swell = fbm_grid(x0, y0, width, height, (420.0, 140.0), layout.seed + 201)
    ripple = value_noise_grid(x0, y0, width, height, 3.0, layout.seed + 202) * 2.0 - 1.0
    return _shade(WATER_RGB, 1.0 + 0.12 * swell + 0.04 * ripple)


def _forest(layout: LandCoverLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    crowns = fbm_grid(x0, y0, width, height, (9.0, 4.0), layout.seed + 301)
    stands = fbm_grid(x0, y0, width, height, (320.0,), layout.seed + 302)
    return _shade(FOREST_RGB, 1.0 + 0.35 * crowns + 0.12 * stands)


def _bare_soil(layout: LandCoverLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    patches = fbm_grid(x0, y0, width, height, (260.0, 60.0), layout.seed + 401)
    crumbs = value_noise_grid(x0, y0, width, height, 3.0, layout.seed + 402) * 2.0 - 1.0
    return _shade(SOIL_RGB, 1.0 + 0.1 * patches + 0.05 * crumbs)


def _farmland(layout: LandCoverLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    # Parcel columns, each shifted vertically by its own offset so the margins do not line up.
    xs = np.arange(x0, x0 + width, dtype=np.int64)
    ys = np.arange(y0, y0 + height, dtype=np.int64)
    column = xs // PARCEL_WIDTH_PX
    shift = (uniform(layout.seed + 501, column) * PARCEL_HEIGHT_PX).astype(np.int64)
    shifted_y = ys[:, None] + shift[None, :]  # (height, width)
    row = shifted_y // PARCEL_HEIGHT_PX
    parcel = hash32(layout.seed + 502, column[None, :], row)
    crop = CROP_RGB[parcel % np.uint32(len(CROP_RGB))]  # (height, width, 3)
    # Crop rows 3 px apart, along x or y per parcel.
    along_x = (parcel >> np.uint32(8)) & np.uint32(1)
    stripes = np.where(along_x == 1, (ys[:, None] // 3) % 2, (xs[None, :] // 3) % 2)
    vigour = 1.0 + 0.08 * fbm_grid(x0, y0, width, height, (70.0,), layout.seed + 503)
    texture = crop * (vigour * np.where(stripes == 1, 0.93, 1.0).astype(np.float32))[..., None]
    hedge = (xs[None, :] % PARCEL_WIDTH_PX < HEDGE_PX) | (shifted_y % PARCEL_HEIGHT_PX < HEDGE_PX)
    texture[hedge] = HEDGE_RGB
    return texture


def _urban(layout: LandCoverLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    # Per axis: position within the road period; roads first, then sidewalk, then two lots.
    lot = (ROAD_PERIOD_PX - ROAD_WIDTH_PX - 2 * SIDEWALK_PX) // 2

    def axis(start: int, count: int, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(start, start + count, dtype=np.int64) - offset
        within = pos % ROAD_PERIOD_PX - ROAD_WIDTH_PX - SIDEWALK_PX  # < 0: road or sidewalk
        road = pos % ROAD_PERIOD_PX < ROAD_WIDTH_PX
        lot_index = (pos // ROAD_PERIOD_PX) * 2 + np.clip(within // lot, 0, 1)
        in_lot = within % lot
        built = (within >= 0) & (within < 2 * lot) & (in_lot >= LOT_GAP_PX) & (in_lot < lot - LOT_GAP_PX)
        return road, built, lot_index, in_lot

    road_x, built_x, lot_x, in_lot_x = axis(x0, width, layout.road_offset[0])
    road_y, built_y, lot_y, in_lot_y = axis(y0, height, layout.road_offset[1])
    roof = hash32(layout.seed + 601, lot_x[None, :], lot_y[:, None])  # (height, width)
    colour = ROOF_RGB[roof % np.uint32(len(ROOF_RGB))]
    # Gabled roofs: the half away from the sun is darker; ridge along x or y per lot.
    ridge_x = (roof >> np.uint32(8)) & np.uint32(1)
    shaded = np.where(ridge_x == 1, in_lot_y[:, None] > lot // 2, in_lot_x[None, :] > lot // 2)
    texture = colour * np.where(shaded, 0.86, 1.0).astype(np.float32)[..., None]
    park = (roof >> np.uint32(12)) % np.uint32(10) == 0
    texture[park] = PARK_RGB
    built = built_x[None, :] & built_y[:, None]
    texture[~built] = SIDEWALK_RGB
    texture[road_x[None, :] | road_y[:, None]] = ROAD_RGB
    wear = 1.0 + 0.06 * fbm_grid(x0, y0, width, height, (90.0, 11.0), layout.seed + 602)
    return texture * wear[..., None]


_TEXTURES = {
    LandCover.WATER: _water,
    LandCover.FOREST: _forest,
    LandCover.FARMLAND: _farmland,
    LandCover.URBAN: _urban,
    LandCover.BARE_SOIL: _bare_soil,
}
