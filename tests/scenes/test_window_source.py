"""`WindowSource`: a window of a scene served as a scene of its own, checked against the cut-out array."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uhr.scenes import ArraySource, Box, WindowSource, open_scene


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@settings(deadline=None, max_examples=80)
@given(data=st.data())
def test_a_window_reads_like_the_cut_out_image(data):
    """Every read of the window equals the same read of the window's pixels cut out beforehand,
    including reads that reach past the window's edge (zeros there, not the scene's pixels)."""
    image = _image(60, 80)
    col, row = data.draw(st.integers(0, 70)), data.draw(st.integers(0, 50))
    width, height = data.draw(st.integers(1, 80 - col)), data.draw(st.integers(1, 60 - row))
    window = WindowSource(ArraySource(image), Box(col, row, width, height))
    cut = ArraySource(np.ascontiguousarray(image[row : row + height, col : col + width]))

    assert (window.width, window.height) == (width, height)
    side = data.draw(st.integers(1, 40))
    np.testing.assert_array_equal(window.read_view(side), cut.read_view(side))
    request = (data.draw(st.integers(-20, 90)), data.draw(st.integers(-20, 70)), data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40)))
    np.testing.assert_array_equal(window.read_window(*request), cut.read_window(*request))


def test_a_window_of_a_cog_reads_the_scene_pixels_inside_it_and_zeros_past_it(rgb_cog):
    path, image = rgb_cog
    with open_scene(str(path)) as scene:
        window = WindowSource(scene, Box(120, 40, 64, 96))
        np.testing.assert_array_equal(window.read_window(0, 0, 64, 96), image[40:136, 120:184])
        corner = window.read_window(60, 90, 10, 10)
        np.testing.assert_array_equal(corner[:6, :4], image[130:136, 180:184])
        assert not corner[6:].any() and not corner[:, 4:].any()
        assert window.read_view(48).shape == (48, 32, 3)


@pytest.mark.parametrize("box", [Box(0, 0, 81, 10), Box(70, 50, 11, 10), Box(-1, 0, 10, 10)])
def test_a_window_past_the_scene_is_refused_with_both_sizes(box):
    with pytest.raises(ValueError, match=r"is not inside the 80x60 scene"):
        WindowSource(ArraySource(_image(60, 80)), box)
