"""Scenes (I/O): scene URI -> RGB uint8 pixel views and windows.

`open_scene(uri)` gives a `Scene` (a `PixelSource`) over a local or object-store raster;
`list_scenes(prefix)` lists an archive; `windows` plans boxes; `normalize` maps bands, types,
nodata and masks to RGB uint8.
"""

from __future__ import annotations

from uhr.scenes.listing import DEFAULT_SCENE_PATTERNS, list_scenes
from uhr.scenes.normalize import NormalizeConfig, Stretch, StretchMode
from uhr.scenes.reader import Scene, open_scene
from uhr.scenes.source import ArraySource, PixelSource, WindowSource, fit_longest_side, resize_rgb
from uhr.scenes.windows import Box, project, random_boxes, tile_boxes

__all__ = [
    "DEFAULT_SCENE_PATTERNS",
    "ArraySource",
    "Box",
    "NormalizeConfig",
    "PixelSource",
    "Scene",
    "Stretch",
    "StretchMode",
    "WindowSource",
    "fit_longest_side",
    "list_scenes",
    "open_scene",
    "project",
    "random_boxes",
    "resize_rgb",
    "tile_boxes",
]
