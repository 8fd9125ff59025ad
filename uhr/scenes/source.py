"""The pixel-source contract between the scene layer and the model.

A model never opens files: it asks a `PixelSource` for whole-scene views and windows, already
normalised to RGB uint8. `uhr.scenes.Scene` is the source over a raster (local or in object
storage); `ArraySource` is the source over an image already in memory (tests, training samples,
small JPEG/PNG inputs); `WindowSource` shows one window of another source as a scene of its own
(training on a region of a large scene).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from uhr.scenes.windows import Box, project


@runtime_checkable
class PixelSource(Protocol):
    """Anything that serves RGB uint8 pixels of one scene.

    Coordinates are scene pixels: `col_off`/`row_off` from the top-left corner, x to the right.
    """

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def read_view(self, max_side: int) -> np.ndarray:
        """The whole scene as (H, W, 3) uint8, aspect kept, longest side exactly `max_side`."""
        ...

    def read_window(
        self,
        col_off: int,
        row_off: int,
        width: int,
        height: int,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """A window as (height, width, 3) uint8, or (out_h, out_w, 3) when `out_size=(out_h, out_w)`.

        Parts of the window past the scene's edge are filled with zeros, never an error.
        """
        ...


def read_windows(
    source: PixelSource, windows: list[tuple[int, int, int, int]], out_size: tuple[int, int] | None = None
) -> list[np.ndarray]:
    """Windows (col_off, row_off, width, height) of `source`, in order.

    A source with its own `read_windows` reads them as one batch (the VQA pipeline's reads them in
    parallel CPU tasks); any other source reads them one by one.
    """
    batch = getattr(source, "read_windows", None)
    if batch is not None:
        return batch(windows, out_size=out_size)
    return [source.read_window(*window, out_size=out_size) for window in windows]


def fit_longest_side(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is `max_side`, aspect kept, each side >= 1."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_rgb(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 array to (height, width, 3); area-averaging when shrinking."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width < image.shape[1] and height < image.shape[0]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


class ArraySource:
    """A `PixelSource` over an (H, W, 3) uint8 array held in memory."""

    def __init__(self, image: np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"ArraySource needs an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"ArraySource needs a non-empty image, got shape {image.shape}")
        self.image = image

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    def read_view(self, max_side: int) -> np.ndarray:
        width, height = fit_longest_side(self.width, self.height, max_side)
        return resize_rgb(self.image, width, height)

    def read_window(
        self,
        col_off: int,
        row_off: int,
        width: int,
        height: int,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        if width <= 0 or height <= 0:
            raise ValueError(f"window size must be positive, got {width}x{height}")
        window = np.zeros((height, width, 3), dtype=np.uint8)
        x0, y0 = max(col_off, 0), max(row_off, 0)
        x1, y1 = min(col_off + width, self.width), min(row_off + height, self.height)
        if x1 > x0 and y1 > y0:
            window[y0 - row_off : y1 - row_off, x0 - col_off : x1 - col_off] = self.image[y0:y1, x0:x1]
        if out_size is not None:
            window = resize_rgb(window, out_size[1], out_size[0])
        return window


class WindowSource:
    """A `PixelSource` showing one window of another source as if the window were the whole scene.

    Coordinates are the window's own (0, 0 at its top-left corner). Anything past the window's
    edge is zeros, as past a scene's edge, so a strategy sees exactly the window whatever it asks
    for. Reads go to the underlying source, at the resolution asked (its overviews serve views).
    """

    def __init__(self, source: PixelSource, window: Box):
        bounds = Box(0, 0, source.width, source.height)
        if window.intersection(bounds) != window:
            raise ValueError(f"window {_box_text(window)} is not inside the {source.width}x{source.height} scene")
        self.source, self.window = source, window

    @property
    def width(self) -> int:
        return self.window.width

    @property
    def height(self) -> int:
        return self.window.height

    def read_view(self, max_side: int) -> np.ndarray:
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
        if width <= 0 or height <= 0:
            raise ValueError(f"window size must be positive, got {width}x{height}")
        out_height, out_width = (height, width) if out_size is None else out_size

        def read(inside: Box, target: Box) -> np.ndarray:
            col, row = self.window.col_off + inside.col_off, self.window.row_off + inside.row_off
            return self.source.read_window(col, row, inside.width, inside.height, out_size=(target.height, target.width))

        return paste_inside(Box(col_off, row_off, width, height), Box(0, 0, self.width, self.height), out_width, out_height, read)


def paste_inside(
    request: Box, bounds: Box, out_width: int, out_height: int, read: Callable[[Box, Box], np.ndarray]
) -> np.ndarray:
    """`request` resampled to (out_height, out_width, 3) uint8: zeros, with the part inside `bounds`
    read by `read(inside, target)` (the scene box to read, its output box) and pasted where it lands."""
    canvas = np.zeros((out_height, out_width, 3), dtype=np.uint8)
    inside = request.intersection(bounds)
    target = None if inside is None else project(inside, request, out_width, out_height)
    if inside is None or target is None:
        return canvas
    canvas[target.row_off : target.row_end, target.col_off : target.col_end] = read(inside, target)
    return canvas


def _box_text(box: Box) -> str:
    return f"(col {box.col_off}, row {box.row_off}, {box.width}x{box.height})"
