"""Rasters shared by the scene tests (written once per module or session; all seeded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .data import pixels, write_raster


@pytest.fixture(scope="module")
def rgb_cog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 700x500 uint8 RGB COG (lossless, 256-px tiles, overviews 2) and its pixels (H, W, 3)."""
    data = pixels(700, 500, 3, "uint8", seed=11)
    path = write_raster(tmp_path_factory.mktemp("rgb") / "rgb.tif", data)
    return path, np.ascontiguousarray(data.transpose(1, 2, 0))


@pytest.fixture(scope="session")
def cog_8k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8192x8192 uint8 RGB JPEG COG (~19 MB, 512-px tiles, overviews 2 to 16); ~6 s to write unloaded."""
    data = pixels(8192, 8192, 3, "uint8", seed=8, texture=16)
    path = tmp_path_factory.mktemp("cog8k") / "scene_8k.tif"
    return write_raster(path, data, compress="JPEG", blocksize=512, quality=80)
