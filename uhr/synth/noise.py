"""Coordinate-hashed noise: the same pixel gets the same value whichever block computes it.

Every random texture of a synthetic scene is a function of absolute scene coordinates and a seed,
never of a random generator's state, so a scene can be rendered block by block, in any order and
with any block size, and come out identical.
"""

from __future__ import annotations

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)


def hash32(*keys: np.ndarray | int) -> np.ndarray:
    """A well-mixed uint32 hash of integer keys (broadcast together), e.g. hash32(seed, x, y).

    Chains the "lowbias32" integer finaliser (C. Wellons) over the keys; negative keys wrap mod 2**32.
    Put scalar keys first: each key costs one mix over the broadcast shape so far.
    """
    h = np.zeros((), dtype=np.uint32)
    for key in keys:
        k = (np.asarray(key, dtype=np.int64).astype(np.uint64) & _MASK32).astype(np.uint32)
        h = _mix(h ^ k ^ np.uint32(0x9E3779B9))
    return h


def _mix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint32)
    # Multiplication mod 2**32 is the point; numpy only warns about it for 0-d operands.
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Hash of the keys as float64 in [0, 1)."""
    return (hash32(*keys) >> np.uint32(8)).astype(np.float64) * (1.0 / (1 << 24))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def value_noise_points(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Value noise in [0, 1) at points (x, y) (broadcast together), lattice spacing `scale` px.

    Pointwise and exact: the result at a point does not depend on which other points are asked,
    which is what the land-cover labels need (truth and pixels must agree to the last bit).
    """
    fx = np.asarray(x, dtype=np.float64) / scale
    fy = np.asarray(y, dtype=np.float64) / scale
    gx = np.floor(fx)
    gy = np.floor(fy)
    wx = _smoothstep(fx - gx)
    wy = _smoothstep(fy - gy)
    ix = gx.astype(np.int64)
    iy = gy.astype(np.int64)
    points = int(np.prod(np.broadcast_shapes(ix.shape, iy.shape)))
    if points == 0:
        return np.zeros(np.broadcast_shapes(ix.shape, iy.shape))
    x_lo, y_lo = int(ix.min()), int(iy.min())
    lattice_x = np.arange(x_lo, int(ix.max()) + 2)
    lattice_y = np.arange(y_lo, int(iy.max()) + 2)
    if lattice_x.size * lattice_y.size <= max(64, 4 * points):
        # Hash each lattice corner once and gather: the same values as hashing every point.
        lattice = uniform(seed, lattice_x[None, :], lattice_y[:, None])
        cx, cy = ix - x_lo, iy - y_lo

        def corner(dx: int, dy: int) -> np.ndarray:
            return lattice[cy + dy, cx + dx]

    else:

        def corner(dx: int, dy: int) -> np.ndarray:
            return uniform(seed, ix + dx, iy + dy)

    top = corner(0, 0) * (1.0 - wx) + corner(1, 0) * wx
    bottom = corner(0, 1) * (1.0 - wx) + corner(1, 1) * wx
    return top * (1.0 - wy) + bottom * wy


def value_noise_grid(x0: int, y0: int, width: int, height: int, scale: float, seed: int) -> np.ndarray:
    """Value noise in [0, 1) on the pixel grid of a window, (height, width) float32.

    Separable: the lattice is hashed once for the window and interpolated along x, then y, so the
    cost is a few operations per pixel whatever `scale` is. Values equal `value_noise_points` up to
    float rounding; use this for textures, the pointwise form where bits matter.
    """
    fx = np.arange(x0, x0 + width, dtype=np.float64) / scale
    fy = np.arange(y0, y0 + height, dtype=np.float64) / scale
    gx = np.floor(fx).astype(np.int64)
    gy = np.floor(fy).astype(np.int64)
    wx = _smoothstep(fx - gx).astype(np.float32)
    wy = _smoothstep(fy - gy).astype(np.float32)
    lattice_x = np.arange(gx[0], gx[-1] + 2)
    lattice_y = np.arange(gy[0], gy[-1] + 2)
    lattice = uniform(seed, lattice_x[None, :], lattice_y[:, None]).astype(np.float32)
    cx = gx - gx[0]
    along_x = lattice[:, cx] * (1.0 - wx) + lattice[:, cx + 1] * wx  # (lattice rows, width)
    cy = gy - gy[0]
    return along_x[cy] * (1.0 - wy)[:, None] + along_x[cy + 1] * wy[:, None]


def fbm_grid(
    x0: int, y0: int, width: int, height: int, scales: tuple[float, ...], seed: int
) -> np.ndarray:
    """Fractal value noise: octaves at `scales` px, amplitudes halving, normalised to [-1, 1)."""
    total = np.zeros((height, width), dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave, scale in enumerate(scales):
        total += amplitude * value_noise_grid(x0, y0, width, height, scale, seed + 7919 * octave)
        norm += amplitude
        amplitude *= 0.5
    return total * (2.0 / norm) - 1.0


def grain(x0: int, y0: int, width: int, height: int, seed: int) -> np.ndarray:
    """Independent per-pixel noise in [-1, 1), (height, width) float32: sensor grain."""
    xs = np.arange(x0, x0 + width, dtype=np.int64)
    ys = np.arange(y0, y0 + height, dtype=np.int64)
    return (uniform(seed, xs[None, :], ys[:, None]) * 2.0 - 1.0).astype(np.float32)
