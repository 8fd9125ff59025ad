"""Normalisation to RGB uint8: stretches, nodata, masks, palettes, band counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from uhr.scenes.normalize import NormalizeConfig, Stretch, StretchMode, compute_stretch, to_rgb, valid_from_nodata


def test_stretch_maps_low_to_0_high_to_255_and_clips():
    stretch = Stretch(low=(100.0,), high=(300.0,))
    data = np.array([[[0, 100, 200, 300, 4000]]], dtype=np.uint16)
    assert stretch.apply(data).tolist() == [[[0, 0, 128, 255, 255]]]


def test_constant_band_maps_to_zero_instead_of_dividing_by_zero():
    assert Stretch(low=(5.0,), high=(5.0,)).apply(np.full((1, 2, 2), 5, dtype=np.int16)).max() == 0


def test_joint_stretch_pools_bands_and_per_band_does_not():
    rng = np.random.default_rng(0)
    data = np.stack([rng.uniform(0, 100, (50, 50)), rng.uniform(1000, 2000, (50, 50))])
    joint = compute_stretch(data, None, (0, 100), per_band=False)
    assert joint.low == (pytest.approx(data.min()),) * 2 and joint.high == (pytest.approx(data.max()),) * 2
    per_band = compute_stretch(data, None, (0, 100), per_band=True)
    assert per_band.low == pytest.approx((data[0].min(), data[1].min()))
    assert per_band.high == pytest.approx((data[0].max(), data[1].max()))


def test_stretch_ignores_invalid_and_non_finite_pixels():
    data = np.array([[[1.0, 2.0, 3.0, np.nan, 1e9]]], dtype=np.float32)
    valid = np.array([[True, True, True, True, False]])
    stretch = compute_stretch(data, valid, (0, 100), per_band=False)
    assert stretch == Stretch(low=(1.0,), high=(3.0,))


def test_stretch_of_no_valid_pixel_is_the_identity():
    data = np.zeros((3, 4, 4), dtype=np.uint16)
    assert compute_stretch(data, np.zeros((4, 4), dtype=bool), (2, 98), False) == Stretch((0.0,) * 3, (255.0,) * 3)


def test_nodata_is_invalid_only_where_every_band_holds_it():
    data = np.array([[[0, 0, 5]], [[0, 7, 0]], [[0, 0, 0]]], dtype=np.uint8)
    assert valid_from_nodata(data, 0).tolist() == [[False, True, True]]
    assert valid_from_nodata(data, None) is None


def test_nan_nodata_and_non_finite_floats_are_invalid():
    data = np.array([[[np.nan, 1.0, np.inf]]], dtype=np.float32)
    assert valid_from_nodata(data, float("nan")).tolist() == [[False, True, False]]
    assert valid_from_nodata(data, None).tolist() == [[False, True, False]]


def test_grey_is_repeated_into_three_equal_channels_and_fill_applied():
    grey = np.array([[[10, 20], [30, 40]]], dtype=np.uint8)
    valid = np.array([[True, False], [True, True]])
    rgb = to_rgb(grey, valid, None, fill=9)
    assert rgb.shape == (2, 2, 3) and rgb.flags.c_contiguous
    assert rgb[:, :, 0].tolist() == [[10, 9], [30, 40]]
    assert (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all()


def test_palette_maps_indices_and_transparent_entries_are_masked():
    palette = np.zeros((256, 4), dtype=np.uint8)
    palette[1] = (255, 0, 0, 255)
    palette[2] = (0, 0, 255, 0)
    rgb = to_rgb(np.array([[[1, 2]]], dtype=np.uint8), None, None, fill=5, palette=palette)
    assert rgb.tolist() == [[[255, 0, 0], [5, 5, 5]]]


def test_non_uint8_without_a_stretch_is_refused():
    with pytest.raises(ValueError, match="need a stretch"):
        to_rgb(np.zeros((3, 2, 2), dtype=np.uint16), None, None, fill=0)


@settings(deadline=None, max_examples=50)
@given(
    data=arrays(np.float32, (3, 6, 7), elements=st.floats(-1e4, 1e4, width=32)),
    low=st.floats(0, 49),
    per_band=st.booleans(),
)
def test_any_stretch_gives_rgb_uint8_in_range(data, low, per_band):
    stretch = compute_stretch(data, None, (low, 100 - low), per_band)
    rgb = to_rgb(data, None, stretch, fill=0)
    assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8
    # The stretch is monotonic: ordering of values within a band is kept.
    order = np.argsort(data[0].ravel(), kind="stable")
    assert (np.diff(rgb[:, :, 0].ravel()[order].astype(int)) >= 0).all()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bands": (1, 2)}, "one band"),
        ({"bands": (0, 1, 2)}, "1-based"),
        ({"percentiles": (98, 2)}, "percentiles"),
        ({"percentiles": (50, 50)}, "percentiles"),  # no spread: every pixel would be one value
        ({"stretch": StretchMode.FIXED}, "value_range"),
        ({"stretch": "fixed", "value_range": (5, 5)}, "low < high"),
        ({"fill": 300}, "less than or equal"),
        ({"strech": "auto"}, "Extra inputs"),
    ],
)
def test_normalize_config_rejects_bad_values(fields, message):
    with pytest.raises(ValidationError, match=message):
        NormalizeConfig(**fields)
