"""Pixel-view geometry shared by every strategy: anyres grids, multi-scale views, tiles, CLIP input.

Pure functions on numpy arrays (H, W, 3) uint8 and plain tuples; nothing here knows the model.

* LLaVA-NeXT / GeoLLaVA-8K anyres: pick the grid "pinpoint" with the largest effective resolution,
  then the least padding (`transformers.image_processing_utils.select_best_resolution`); resize the
  image into it keeping aspect (bicubic, as `LlavaNextImageProcessor`); pad the rest with black,
  centred; cut raster-order tiles.
* Multi-scale views (UHR-BAT, c2f): a whole-scene view with longest side S, aspect kept, padded with
  zeros at the bottom/right to whole tiles, cut into raster-order tiles.
* CLIP normalisation with the image processors' default OpenAI mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

Box = tuple[float, float, float, float]


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {image.shape}")


def resize_bicubic(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 with PIL bicubic, as LLaVA-NeXT's processor resizes."""
    _check_image(image)
    if image.shape[0] == height and image.shape[1] == width:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC))


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT anyres
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnyresLayout:
    """Where an image sits in its anyres canvas (all sizes in pixels, (height, width) order)."""

    pinpoint: tuple[int, int]
    """(height, width) of the canvas: the chosen grid, whole tiles."""
    resized: tuple[int, int]
    """(height, width) of the image after its aspect-keeping resize into the canvas."""
    offset: tuple[int, int]
    """(top, left) of the resized image in the canvas (black padding is centred)."""
    tile: int

    @property
    def rows(self) -> int:
        return self.pinpoint[0] // self.tile

    @property
    def cols(self) -> int:
        return self.pinpoint[1] // self.tile

    def scene_box(self, width: int, height: int) -> Box:
        """(x0, y0, x1, y1) in scene pixels covered by the whole canvas, padding included."""
        sx, sy = width / self.resized[1], height / self.resized[0]
        top, left = self.offset
        return (-left * sx, -top * sy, (self.pinpoint[1] - left) * sx, (self.pinpoint[0] - top) * sy)

    def valid_patches(self, patch: int) -> np.ndarray:
        """(rows * g, cols * g) bool: True where a `patch`-pixel token overlaps the resized image."""
        top, left = self.offset
        ys = np.arange(self.pinpoint[0] // patch) * patch
        xs = np.arange(self.pinpoint[1] // patch) * patch
        in_rows = (ys + patch > top) & (ys < top + self.resized[0])
        in_cols = (xs + patch > left) & (xs < left + self.resized[1])
        return in_rows[:, None] & in_cols[None, :]


def select_pinpoint(width: int, height: int, pinpoints: list[list[int]] | list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) grid LLaVA-NeXT picks for a `width` x `height` image.

    Largest effective resolution `min(downscaled area, original area)`, ties to the least wasted
    canvas area; the first listed wins a full tie.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not pinpoints:
        raise ValueError("no pinpoints to choose from")
    best = select_best_resolution((height, width), [tuple(p) for p in pinpoints])
    return int(best[0]), int(best[1])


def anyres_layout(width: int, height: int, pinpoint: tuple[int, int], tile: int) -> AnyresLayout:
    """Aspect-keeping fit of a `width` x `height` image into `pinpoint`, as LLaVA-NeXT resizes and pads.

    The limiting side fills the canvas; the other is `ceil(side * scale)` capped at the canvas
    (`transformers.image_processing_utils.get_patch_output_size`); padding is split with the odd
    pixel at the bottom/right.
    """
    target_h, target_w = pinpoint
    if target_h % tile or target_w % tile:
        raise ValueError(f"pinpoint {pinpoint} is not a whole number of {tile}-px tiles")
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(math.ceil(width * scale_h), target_w)
    return AnyresLayout(
        pinpoint=(target_h, target_w),
        resized=(new_h, new_w),
        offset=((target_h - new_h) // 2, (target_w - new_w) // 2),
        tile=tile,
    )


def anyres_canvas(image: np.ndarray, layout: AnyresLayout) -> np.ndarray:
    """(pinpoint_h, pinpoint_w, 3): `image` resized into the layout (bicubic), black around it."""
    resized = resize_bicubic(image, layout.resized[1], layout.resized[0])
    canvas = np.zeros((*layout.pinpoint, 3), dtype=np.uint8)
    top, left = layout.offset
    canvas[top : top + layout.resized[0], left : left + layout.resized[1]] = resized
    return canvas


# ----------------------------------------------------------------------------------------------
# Multi-scale views and tiles
# ----------------------------------------------------------------------------------------------


def tile_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of whole tiles covering a `height` x `width` view (ceil on both sides)."""
    return -(-height // tile), -(-width // tile)


def pad_to_tiles(view: np.ndarray, tile: int) -> np.ndarray:
    """Zero-pad an (H, W, 3) view at the bottom/right to whole `tile`-px tiles."""
    _check_image(view, "view")
    rows, cols = tile_grid(view.shape[0], view.shape[1], tile)
    pad_h, pad_w = rows * tile - view.shape[0], cols * tile - view.shape[1]
    if pad_h == 0 and pad_w == 0:
        return view
    return np.pad(view, ((0, pad_h), (0, pad_w), (0, 0)))


def cut_tiles(canvas: np.ndarray, tile: int) -> np.ndarray:
    """(rows * tile, cols * tile, 3) -> (rows * cols, tile, tile, 3) in raster order, C-contiguous and
    writable (a read-only decoded view is copied), as `torch.from_numpy` wants it."""
    height, width = canvas.shape[:2]
    if height % tile or width % tile:
        raise ValueError(f"canvas {height}x{width} is not a whole number of {tile}-px tiles")
    rows, cols = height // tile, width // tile
    # (rows, tile, cols, tile, 3) -> (rows, cols, tile, tile, 3)
    tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    return np.require(tiles.reshape(rows * cols, tile, tile, 3), requirements=("C", "W"))


def valid_patches(height: int, width: int, rows: int, cols: int, patch_grid: int, patch: int) -> np.ndarray:
    """(rows * g, cols * g) bool for a view padded bottom/right: False on tokens that see only padding."""
    ys = np.arange(rows * patch_grid) * patch
    xs = np.arange(cols * patch_grid) * patch
    return (ys < height)[:, None] & (xs < width)[None, :]


def padded_box(scene_width: int, scene_height: int, view_width: int, view_height: int, tile: int) -> Box:
    """Scene-pixel box covered by the tile grid of a whole-scene view padded bottom/right."""
    rows, cols = tile_grid(view_height, view_width, tile)
    return (0.0, 0.0, cols * tile * scene_width / view_width, rows * tile * scene_height / view_height)


# ----------------------------------------------------------------------------------------------
# CLIP input
# ----------------------------------------------------------------------------------------------


def clip_normalize(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 (T, S, S, 3) -> float32 (T, 3, S, S): rescaled to [0, 1], OpenAI CLIP mean/std."""
    if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be uint8 (T, S, S, 3), got {tiles.dtype} {tuple(tiles.shape)}")
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32, device=tiles.device)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32, device=tiles.device)
    pixels = tiles.permute(0, 3, 1, 2).float() / 255.0
    return (pixels - mean[:, None, None]) / std[:, None, None]


__all__ = [
    "AnyresLayout",
    "Box",
    "anyres_canvas",
    "anyres_layout",
    "clip_normalize",
    "cut_tiles",
    "pad_to_tiles",
    "padded_box",
    "resize_bicubic",
    "select_pinpoint",
    "tile_grid",
    "valid_patches",
]
