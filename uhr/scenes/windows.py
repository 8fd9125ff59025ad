"""Window planning: pure arithmetic on pixel boxes, no I/O.

A `Box` is a rectangle in scene pixels (column offset, row offset, width, height; x to the right,
y down) that may reach past the scene's edge: readers pad what lies outside with zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """A pixel rectangle; `width` and `height` are positive."""

    col_off: int
    row_off: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"a box needs a positive size, got {self.width}x{self.height}")

    @property
    def col_end(self) -> int:
        return self.col_off + self.width

    @property
    def row_end(self) -> int:
        return self.row_off + self.height

    def intersection(self, other: Box) -> Box | None:
        """The part of this box inside `other`, or None when they do not overlap."""
        col_off, row_off = max(self.col_off, other.col_off), max(self.row_off, other.row_off)
        col_end, row_end = min(self.col_end, other.col_end), min(self.row_end, other.row_end)
        if col_end <= col_off or row_end <= row_off:
            return None
        return Box(col_off, row_off, col_end - col_off, row_end - row_off)


def project(inner: Box, outer: Box, out_width: int, out_height: int) -> Box | None:
    """Where `inner`, a part of `outer`, lands when `outer` is resampled to out_width x out_height.

    Each edge maps as x' = floor((x - outer.col_off) * out_width / outer.width + 1/2), so the
    projections of adjacent boxes tile the output without gaps; None when `inner` shrinks to
    less than one output pixel.
    """
    if inner.intersection(outer) != inner:
        raise ValueError(f"{inner} is not inside {outer}")

    def edge(value: int, origin: int, size: int, out: int) -> int:
        return math.floor((value - origin) * out / size + 0.5)

    col0 = edge(inner.col_off, outer.col_off, outer.width, out_width)
    col1 = edge(inner.col_end, outer.col_off, outer.width, out_width)
    row0 = edge(inner.row_off, outer.row_off, outer.height, out_height)
    row1 = edge(inner.row_end, outer.row_off, outer.height, out_height)
    if col1 <= col0 or row1 <= row0:
        return None
    return Box(col0, row0, col1 - col0, row1 - row0)


def tile_boxes(width: int, height: int, tile: int, stride: int | None = None) -> Iterator[Box]:
    """Square `tile`-sized boxes covering a width x height scene, row by row.

    Boxes start every `stride` pixels (default `tile`: no overlap) from the top-left corner; the
    last column and row reach past the edge when the scene is not a multiple of the stride, so
    every pixel is covered and every box has the same size. There are
    ceil(max(width - tile, 0) / stride) + 1 columns, and likewise rows.
    """
    stride = tile if stride is None else stride
    if width <= 0 or height <= 0 or tile <= 0 or stride <= 0:
        raise ValueError(f"need a positive scene, tile and stride, got {width}x{height}, {tile}, {stride}")
    if stride > tile:
        raise ValueError(f"stride {stride} > tile {tile} would leave gaps")
    cols = math.ceil(max(width - tile, 0) / stride) + 1
    rows = math.ceil(max(height - tile, 0) / stride) + 1
    for row in range(rows):
        for col in range(cols):
            yield Box(col * stride, row * stride, tile, tile)


def random_boxes(width: int, height: int, size: int, count: int, rng: np.random.Generator) -> Iterator[Box]:
    """`count` `size`-square boxes at uniform random offsets, inside the scene where it is large enough."""
    if width <= 0 or height <= 0 or size <= 0 or count < 0:
        raise ValueError(f"need a positive scene and size, got {width}x{height}, {size}, count {count}")
    for _ in range(count):
        col = int(rng.integers(0, max(width - size, 0) + 1))
        row = int(rng.integers(0, max(height - size, 0) + 1))
        yield Box(col, row, size, size)
