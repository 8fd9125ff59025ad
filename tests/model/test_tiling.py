"""View geometry: anyres layouts agree with LLaVA-NeXT's processor; tiles, padding, masks, boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from uhr.model.tiling import (
    anyres_canvas,
    anyres_layout,
    clip_normalize,
    cut_tiles,
    pad_to_tiles,
    padded_box,
    select_pinpoint,
    tile_grid,
    valid_patches,
)

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
sides = st.integers(min_value=1, max_value=5000)


@settings(max_examples=200, deadline=None)
@given(width=sides, height=sides)
def test_anyres_layout_matches_llava_next_processor(width, height):
    pinpoint = select_pinpoint(width, height, PINPOINTS_336)
    assert list(pinpoint) in PINPOINTS_336
    layout = anyres_layout(width, height, pinpoint, 336)
    # The processor's own size and padding computations.
    dummy = np.empty((3, height, width), dtype=np.uint8)
    resized = get_patch_output_size(dummy, pinpoint, input_data_format=ChannelDimension.FIRST)
    assert layout.resized == tuple(resized)
    (top, bottom), (left, right) = LlavaNextImageProcessorPil()._get_padding_size(resized, pinpoint)
    assert layout.offset == (top, left)
    assert top + layout.resized[0] + bottom == pinpoint[0] and left + layout.resized[1] + right == pinpoint[1]
    # The image fills one side of the canvas.
    assert layout.resized[0] == pinpoint[0] or layout.resized[1] == pinpoint[1]
    assert (layout.rows, layout.cols) == (pinpoint[0] // 336, pinpoint[1] // 336)


@settings(max_examples=50, deadline=None)
@given(width=st.integers(1, 200), height=st.integers(1, 200))
def test_anyres_canvas_and_valid_patches(width, height):
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    layout = anyres_layout(width, height, select_pinpoint(width, height, [[32, 64], [64, 32], [64, 64]]), 32)
    canvas = anyres_canvas(image, layout)
    assert canvas.shape == (*layout.pinpoint, 3)
    top, left = layout.offset
    inside = np.zeros(layout.pinpoint, dtype=bool)
    inside[top : top + layout.resized[0], left : left + layout.resized[1]] = True
    assert (canvas[inside] > 0).all() and (canvas[~inside] == 0).all()
    # A 4-px token is valid exactly when it sees a pixel of the image.
    valid = layout.valid_patches(4)
    seen = inside.reshape(layout.pinpoint[0] // 4, 4, layout.pinpoint[1] // 4, 4).any(axis=(1, 3))
    np.testing.assert_array_equal(valid, seen)
    # The canvas box maps canvas pixels back onto the scene: the image part is exactly the scene.
    x0, y0, x1, y1 = layout.scene_box(width, height)
    sx, sy = (x1 - x0) / layout.pinpoint[1], (y1 - y0) / layout.pinpoint[0]
    assert x0 + left * sx == pytest.approx(0, abs=1e-6) and y0 + top * sy == pytest.approx(0, abs=1e-6)
    assert x0 + (left + layout.resized[1]) * sx == pytest.approx(width)
    assert y0 + (top + layout.resized[0]) * sy == pytest.approx(height)


def test_select_pinpoint_prefers_resolution_then_less_padding():
    assert select_pinpoint(1000, 500, PINPOINTS_336) == (336, 672)  # 2:1 fits exactly
    assert select_pinpoint(500, 1000, PINPOINTS_336) == (672, 336)
    assert select_pinpoint(2000, 2000, PINPOINTS_336) == (672, 672)
    assert select_pinpoint(300, 300, [[672, 672], [336, 672]]) == (336, 672)  # same resolution, less padding
    with pytest.raises(ValueError, match="positive"):
        select_pinpoint(0, 10, PINPOINTS_336)
    with pytest.raises(ValueError, match="not a whole number"):
        anyres_layout(10, 10, (100, 336), 336)


@settings(max_examples=50, deadline=None)
@given(height=st.integers(1, 100), width=st.integers(1, 100), tile=st.sampled_from([8, 16, 32]))
def test_pad_cut_and_valid(height, width, tile):
    rng = np.random.default_rng(height * 1000 + width)
    view = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)
    padded = pad_to_tiles(view, tile)
    rows, cols = tile_grid(height, width, tile)
    assert padded.shape == (rows * tile, cols * tile, 3)
    np.testing.assert_array_equal(padded[:height, :width], view)
    assert (padded[height:] == 0).all() and (padded[:, width:] == 0).all()
    tiles = cut_tiles(padded, tile)
    assert tiles.shape == (rows * cols, tile, tile, 3)
    for index in (0, rows * cols - 1, (rows * cols) // 2):  # raster order
        r, c = divmod(index, cols)
        np.testing.assert_array_equal(tiles[index], padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile])
    patch = tile // 4
    valid = valid_patches(height, width, rows, cols, 4, patch)
    seen = (padded.reshape(rows * 4, patch, cols * 4, patch, 3) > 0).any(axis=(1, 3, 4))
    np.testing.assert_array_equal(valid, seen)


def test_padded_box_and_errors():
    # A 1000 x 500 scene viewed at 672 x 336 in 336 tiles: exact fit, box = the scene.
    assert padded_box(1000, 500, 672, 336, 336) == (0.0, 0.0, 1000.0, 500.0)
    # A 700-px view of a 1400-px scene padded to 1008: the grid covers 2016 scene pixels.
    assert padded_box(1400, 1400, 700, 700, 336) == (0.0, 0.0, 2016.0, 2016.0)
    with pytest.raises(ValueError, match="not a whole number"):
        cut_tiles(np.zeros((10, 16, 3), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        pad_to_tiles(np.zeros((10, 16), dtype=np.uint8), 8)


def test_clip_normalize_matches_processor():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    processor = LlavaNextImageProcessorPil()
    expected = np.stack(
        [
            processor.normalize(processor.rescale(t.transpose(2, 0, 1), 1 / 255), processor.image_mean, processor.image_std)
            for t in tiles
        ]
    )
    torch.testing.assert_close(clip_normalize(torch.from_numpy(tiles)), torch.from_numpy(expected), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        clip_normalize(torch.zeros(1, 16, 16, 3))
