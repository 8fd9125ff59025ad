"""Window planning: pure box arithmetic, checked on invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uhr.scenes.windows import Box, project, random_boxes, tile_boxes

sizes = st.integers(min_value=1, max_value=300)


@settings(deadline=None, max_examples=60)
@given(width=sizes, height=sizes, tile=st.integers(8, 64), data=st.data())
def test_tile_boxes_cover_every_pixel_with_equal_boxes(width, height, tile, data):
    stride = data.draw(st.integers(tile // 4, tile))
    boxes = list(tile_boxes(width, height, tile, stride))
    covered = np.zeros((height, width), dtype=bool)
    for box in boxes:
        assert (box.width, box.height) == (tile, tile)
        covered[box.row_off : box.row_end, box.col_off : box.col_end] = True
    assert covered.all()
    cols = math.ceil(max(width - tile, 0) / stride) + 1
    rows = math.ceil(max(height - tile, 0) / stride) + 1
    assert len(boxes) == rows * cols
    # No box starts outside the scene, so none is all padding.
    assert all(box.col_off < width and box.row_off < height for box in boxes)


def test_tile_boxes_without_overlap_partition_an_exact_multiple():
    boxes = list(tile_boxes(672, 336, 336))
    assert boxes == [Box(0, 0, 336, 336), Box(336, 0, 336, 336)]


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 10, 4), "positive"), ((10, 10, 4, 5), "gaps"), ((10, 10, 0), "positive")],
)
def test_tile_boxes_rejects_bad_plans(args, message):
    with pytest.raises(ValueError, match=message):
        list(tile_boxes(*args))


@settings(deadline=None)
@given(
    outer=st.builds(Box, st.integers(-50, 50), st.integers(-50, 50), sizes, sizes),
    out_width=sizes,
    out_height=sizes,
    cut=st.floats(0.0, 1.0),
)
def test_projections_of_two_halves_tile_the_output(outer, out_width, out_height, cut):
    # Split the outer box in two columns; their projections must abut exactly and fill the width.
    split = outer.col_off + int(cut * outer.width)
    parts = [
        Box(outer.col_off, outer.row_off, split - outer.col_off, outer.height) if split > outer.col_off else None,
        Box(split, outer.row_off, outer.col_end - split, outer.height) if split < outer.col_end else None,
    ]
    projected = [project(part, outer, out_width, out_height) for part in parts if part is not None]
    projected = [box for box in projected if box is not None]
    assert sum(box.width for box in projected) == out_width
    assert all(box.height == out_height and box.row_off == 0 for box in projected)
    if len(projected) == 2:
        assert projected[0].col_end == projected[1].col_off


def test_project_is_identity_at_scale_one_and_scales_offsets():
    outer = Box(-10, -20, 100, 50)
    assert project(Box(0, 0, 90, 30), outer, 100, 50) == Box(10, 20, 90, 30)
    assert project(Box(0, 0, 90, 30), outer, 50, 25) == Box(5, 10, 45, 15)
    assert project(Box(0, 0, 1, 1), outer, 10, 5) is None
    # Edges round half up: at half scale, pixel columns 1-2 of 4 land on output column 1, not 0.
    assert project(Box(1, 0, 2, 1), Box(0, 0, 4, 1), 2, 1) == Box(1, 0, 1, 1)
    assert project(Box(0, 0, 3, 1), Box(0, 0, 4, 1), 2, 1) == Box(0, 0, 2, 1)
    with pytest.raises(ValueError, match="not inside"):
        project(Box(-20, 0, 5, 5), outer, 10, 10)


@settings(deadline=None, max_examples=60)
@given(
    a=st.builds(Box, st.integers(-20, 20), st.integers(-20, 20), sizes, sizes),
    b=st.builds(Box, st.integers(-20, 20), st.integers(-20, 20), sizes, sizes),
)
def test_intersection_is_the_common_pixels(a, b):
    grid = np.zeros((2, 400, 400), dtype=bool)
    for layer, box in enumerate((a, b)):
        grid[layer, box.row_off + 40 : box.row_end + 40, box.col_off + 40 : box.col_end + 40] = True
    common = grid[0] & grid[1]
    inter = a.intersection(b)
    if inter is None:
        assert not common.any()
    else:
        expected = np.zeros_like(common)
        expected[inter.row_off + 40 : inter.row_end + 40, inter.col_off + 40 : inter.col_end + 40] = True
        assert (common == expected).all()


def test_box_rejects_empty_size():
    with pytest.raises(ValueError, match="positive size"):
        Box(0, 0, 0, 5)


def test_random_boxes_are_seeded_and_inside():
    first = list(random_boxes(1000, 700, 336, 16, np.random.default_rng(7)))
    second = list(random_boxes(1000, 700, 336, 16, np.random.default_rng(7)))
    assert first == second and len(first) == 16
    assert all(0 <= box.col_off and box.col_end <= 1000 and 0 <= box.row_off and box.row_end <= 700 for box in first)
    # A scene smaller than the box: boxes start at the corner and reach past the edge.
    assert set(random_boxes(100, 50, 336, 3, np.random.default_rng(0))) == {Box(0, 0, 336, 336)}
