"""The scene reader on local rasters written by rasterio: geometry, windows, views, normalisation."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import rasterio
import rasterio.control
import rasterio.rpc
import rasterio.transform
import rasterio.warp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning

from uhr.errors import SceneError, SceneWarning
from uhr.scenes import ArraySource, NormalizeConfig, PixelSource, Stretch, fit_longest_side, open_scene, resize_rgb
from uhr.scenes.normalize import compute_stretch

from .data import CRS, TRANSFORM, pixels, write_raster


def hwc(data: np.ndarray) -> np.ndarray:
    """(bands, H, W) -> (H, W, bands)."""
    return np.ascontiguousarray(data.transpose(1, 2, 0))


def test_metadata_of_a_georeferenced_cog(rgb_cog):
    path, _ = rgb_cog
    with open_scene(path) as scene:
        assert (scene.width, scene.height, scene.count, scene.dtype) == (700, 500, 3, "uint8")
        assert scene.crs == rasterio.crs.CRS.from_string(CRS) and scene.transform == TRANSFORM
        assert scene.overviews == [2, 4] and scene.nodata is None and scene.bands == (1, 2, 3)
        assert isinstance(scene, PixelSource)
        # Easting 500000 is the central meridian of UTM zone 33 (15 deg E): the west edge.
        west, south, east, north = scene.footprint.bounds
        assert west == pytest.approx(15.0, abs=1e-9)
        assert 0.003 < east - west < 0.006 and 0.001 < north - south < 0.003  # 350 m x 250 m at 41.5 N
        assert scene.footprint.is_valid and len(scene.footprint.exterior.coords) > 60
    assert scene.closed


@pytest.mark.parametrize("centre_lon", [179.995, -179.995])
def test_a_footprint_across_the_antimeridian_is_split_there(tmp_path, centre_lon):
    """A 1-km UTM zone 60/1 scene straddling +-180 deg: two valid parts, not a ring round the globe."""
    crs = "EPSG:32660" if centre_lon > 0 else "EPSG:32601"
    (x,), (y,) = rasterio.warp.transform("EPSG:4326", crs, [centre_lon], [65.0])
    (x_near,), (y_near,) = rasterio.warp.transform("EPSG:4326", crs, [centre_lon - np.sign(centre_lon) * 2], [65.0])
    areas = []
    for name, (cx, cy) in [("across", (x, y)), ("near", (x_near, y_near))]:
        profile = {"driver": "GTiff", "width": 200, "height": 200, "count": 3, "dtype": "uint8", "crs": crs}
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", transform=rasterio.transform.from_origin(cx - 500, cy + 500, 5, 5), **profile) as ds:
            ds.write(pixels(200, 200, 3, "uint8", seed=14))
        with open_scene(path) as scene:
            footprint = scene.footprint
        assert footprint.is_valid
        areas.append(footprint.area)
        if name == "across":
            assert footprint.geom_type == "MultiPolygon" and len(footprint.geoms) == 2
            assert footprint.bounds[0] == -180.0 and footprint.bounds[2] == 180.0
        else:
            assert footprint.geom_type == "Polygon" and footprint.bounds[2] - footprint.bounds[0] < 0.05
    assert areas[0] == pytest.approx(areas[1], rel=1e-3)


def test_a_scene_around_the_pole_opens_without_a_footprint(tmp_path):
    """Antarctic polar stereographic, 2000 km across the South Pole: no lon/lat polygon, pixels fine."""
    profile = {"driver": "GTiff", "width": 200, "height": 200, "count": 3, "dtype": "uint8", "crs": "EPSG:3031"}
    path = tmp_path / "pole.tif"
    with rasterio.open(path, "w", transform=rasterio.transform.from_origin(-1e6, 1e6, 1e4, 1e4), **profile) as ds:
        ds.write(pixels(200, 200, 3, "uint8", seed=15))
    with pytest.warns(SceneWarning, match="no footprint"), open_scene(path) as scene:
        assert scene.footprint is None
        assert scene.read_view(100).shape == (100, 100, 3)


def test_a_footprint_of_warped_gcps_follows_gdals_gcp_transformer(tmp_path):
    """Nine GCPs of a curved outline: the corners are where GDAL's GCP transformer puts them, not
    where an affine fit of the GCPs does (off by the fit's residual)."""
    side = 512
    gcps = [
        rasterio.control.GroundControlPoint(row=r, col=c, x=10.0 + c / 1000 + (r * c) / 1e6, y=50.0 - r / 1000 - (c / 1000) ** 2 / 4)
        for r in (0, side / 2, side)
        for c in (0, side / 2, side)
    ]
    path = tmp_path / "gcps.tif"
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8", "gcps": gcps, "crs": "EPSG:4326"}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(pixels(side, side, 3, "uint8", seed=16))
    with open_scene(path) as scene, rasterio.transform.GCPTransformer(gcps) as gdal:
        corners = np.asarray(scene.footprint.exterior.coords)
        for row, col in [(0, 0), (0, side), (side, side), (side, 0)]:
            expected = np.asarray(gdal.xy(row, col, offset="ul"))
            assert np.abs(corners - expected).sum(axis=1).min() < 1e-9
        assert scene.footprint.bounds[:2] == pytest.approx((10.0, 50.0 - side / 1000 - (side / 1000) ** 2 / 4), abs=1e-9)


def test_an_rpc_only_scene_gets_its_footprint_at_the_rpcs_mean_height(tmp_path):
    """Raw satellite products (L1B, Primary, Basic) carry RPCs and no geotransform: the outline is
    GDAL's RPC transformer's, at the RPCs' height offset (no DEM)."""
    zeros = [0.0] * 20
    rpcs = rasterio.rpc.RPC(
        height_off=300.0, height_scale=500.0, lat_off=10.0, lat_scale=0.05, long_off=20.0, long_scale=0.05,
        line_off=128.0, line_scale=128.0, samp_off=128.0, samp_scale=128.0,
        line_num_coeff=[0.0, 0.0, -1.0, 0.01] + zeros[4:], line_den_coeff=[1.0] + zeros[1:],
        samp_num_coeff=[0.0, 1.0, 0.0, 0.02] + zeros[4:], samp_den_coeff=[1.0] + zeros[1:],
    )  # fmt: skip
    path = tmp_path / "rpc.tif"
    profile = {"driver": "GTiff", "width": 256, "height": 256, "count": 3, "dtype": "uint8", "rpcs": rpcs}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(pixels(256, 256, 3, "uint8", seed=18))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with open_scene(path) as scene, rasterio.transform.RPCTransformer(rpcs, RPC_HEIGHT=300.0) as gdal:
            assert scene.crs is None and scene.footprint is not None and scene.footprint.is_valid
            corners = np.asarray(scene.footprint.exterior.coords)
            expected = np.asarray(gdal.xy(0, 0, offset="ul"))
            assert np.abs(corners - expected).sum(axis=1).min() < 1e-9
            # About 0.1 x 0.1 degrees round (20 E, 10 N): the RPCs' scales either side of their offsets.
            west, south, east, north = scene.footprint.bounds
            assert 19.9 < west < east < 20.1 and 9.9 < south < north < 10.1 and east - west > 0.09


def test_an_alpha_band_is_honoured_beside_a_nodata_value(tmp_path):
    # `gdalwarp -dstalpha` copies the source's nodata: GDAL then reports the nodata mask, not the alpha.
    data = np.concatenate([pixels(64, 64, 3, "uint8", seed=17) | 1, np.full((1, 64, 64), 255, np.uint8)])
    data[:3, :, :32] = 50
    data[3, :, :32] = 0
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    path = write_raster(tmp_path / "rgba_nodata.tif", data, colorinterp=interp, nodata=0)
    with open_scene(path, normalize=NormalizeConfig(fill=9)) as scene:
        window = scene.read_window(0, 0, 64, 64)
    assert (window[:, :32] == 9).all()
    np.testing.assert_array_equal(window[:, 32:], hwc(data[:3])[:, 32:])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    col_off=st.integers(-400, 750),
    row_off=st.integers(-400, 550),
    width=st.integers(1, 400),
    height=st.integers(1, 400),
)
def test_windows_are_exact_and_padded_with_zeros_past_the_edge(rgb_cog, col_off, row_off, width, height):
    path, image = rgb_cog
    with open_scene(path) as scene:
        window = scene.read_window(col_off, row_off, width, height)
    assert window.dtype == np.uint8 and window.shape == (height, width, 3)
    np.testing.assert_array_equal(window, ArraySource(image).read_window(col_off, row_off, width, height))


@pytest.mark.parametrize("max_side", [1, 100, 672, 699, 700, 1401])
def test_read_view_has_longest_side_exactly_max_side(rgb_cog, max_side):
    path, _ = rgb_cog
    with open_scene(path) as scene:
        view = scene.read_view(max_side)
    width, height = fit_longest_side(700, 500, max_side)
    assert view.shape == (height, width, 3) and max(view.shape[:2]) == max_side


def test_tiny_and_non_square_scenes_are_scenes_too(tmp_path):
    path = write_raster(tmp_path / "tiny.tif", pixels(7, 5, 3, "uint8", seed=1))
    with open_scene(path) as scene:
        assert scene.read_view(672).shape == (480, 672, 3)
        corner = scene.read_window(-2, -2, 4, 4)
    np.testing.assert_array_equal(corner[2:, 2:], hwc(pixels(7, 5, 3, "uint8", seed=1))[:2, :2])
    assert not corner[:2].any() and not corner[:, :2].any()


def test_overview_view_matches_a_full_resolution_decimation(tmp_path):
    data = pixels(2048, 1536, 3, "uint8", seed=2)
    path = write_raster(tmp_path / "scene.tif", data)
    with open_scene(path) as scene:
        assert scene.overviews == [2, 4, 8]
        view = scene.read_view(256)
    reference = resize_rgb(hwc(data), 256, 192)
    difference = np.abs(view.astype(np.int16) - reference)
    assert difference.mean() < 1.0 and difference.max() <= 4


def test_resampled_window_matches_resizing_the_exact_window(rgb_cog):
    path, image = rgb_cog
    with open_scene(path) as scene:
        # Aligned on the overview grid, so the overview's averages are the window's averages.
        small = scene.read_window(100, 52, 400, 300, out_size=(75, 100))
        large = scene.read_window(100, 50, 40, 30, out_size=(90, 120))
    difference = np.abs(small.astype(np.int16) - resize_rgb(image[52:352, 100:500], 100, 75))
    assert small.shape == (75, 100, 3) and difference.mean() < 1.0
    assert large.shape == (90, 120, 3)
    difference = np.abs(large.astype(np.int16) - resize_rgb(image[50:80, 100:140], 120, 90))
    assert difference.mean() < 6.0


def test_resampled_window_past_the_edge_keeps_the_padding_proportional(rgb_cog):
    path, _ = rgb_cog
    with open_scene(path) as scene:
        # Half the window lies right of the scene: the right half of the output is zeros.
        window = scene.read_window(500, 0, 400, 200, out_size=(100, 200))
    assert not window[:, 100:].any() and window[:, :100].any()


def decoded(path) -> np.ndarray:
    """All pixels of `path` as GDAL decodes them, (H, W, bands)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as dataset:
            return hwc(dataset.read())


def test_jpeg_compressed_cog_reads_the_decoded_pixels(tmp_path):
    data = pixels(600, 400, 3, "uint8", seed=3)
    path = write_raster(tmp_path / "jpeg.tif", data, compress="JPEG")
    with open_scene(path) as scene:
        window = scene.read_window(-5, 10, 600, 400)
    np.testing.assert_array_equal(window, ArraySource(decoded(path)).read_window(-5, 10, 600, 400))


def coarsest_overview(path, bands) -> np.ndarray:
    """The coarsest overview of `bands` as stored, read straight through rasterio."""
    with rasterio.open(path) as dataset:
        level = len(dataset.overviews(bands[0])) - 1
    with rasterio.open(path, overview_level=level) as overview:
        return overview.read(list(bands))


def test_uint16_grey_is_stretched_from_the_coarsest_overview(tmp_path):
    data = pixels(1024, 768, 1, "uint16", seed=4)
    path = write_raster(tmp_path / "pan.tif", data)
    with open_scene(path) as scene:
        expected = compute_stretch(coarsest_overview(path, (1,)), None, (2, 98), per_band=False)
        assert scene.stretch == expected
        window = scene.read_window(10, 20, 64, 48)
    assert (window[..., 0] == window[..., 1]).all() and (window[..., 1] == window[..., 2]).all()
    np.testing.assert_array_equal(window[..., 0], expected.apply(data[:, 20:68, 10:74])[0])


def test_int16_bands_share_one_stretch_and_overlapping_windows_agree(tmp_path):
    data = pixels(1024, 1024, 3, "int16", seed=5)
    path = write_raster(tmp_path / "int16.tif", data)
    with open_scene(path) as scene:
        stretch = scene.stretch
        first = scene.read_window(100, 100, 300, 300)
        second = scene.read_window(250, 250, 300, 300)
        assert scene.stretch is stretch
    assert len(set(stretch.low)) == 1 and len(set(stretch.high)) == 1
    # Tiles of one scene are normalised alike: the overlap is identical in both windows.
    np.testing.assert_array_equal(first[150:, 150:], second[:150, :150])
    np.testing.assert_array_equal(first, hwc(stretch.apply(data[:, 100:400, 100:400])))


def test_per_band_stretch_and_fixed_range(tmp_path):
    data = pixels(512, 512, 3, "uint16", seed=6)
    data[2] //= 4  # a dim band
    path = write_raster(tmp_path / "u16.tif", data)
    with open_scene(path, normalize=NormalizeConfig(per_band=True)) as scene:
        assert scene.stretch.high[2] < scene.stretch.high[0] / 2
    fixed = NormalizeConfig(stretch="fixed", value_range=(0, 4200))
    with open_scene(path, normalize=fixed) as scene:
        assert scene.stretch == Stretch(low=(0.0,) * 3, high=(4200.0,) * 3)
        window = scene.read_window(0, 0, 32, 32)
    np.testing.assert_array_equal(window, hwc(scene.stretch.apply(data[:, :32, :32])))


def test_float_nan_nodata_is_filled(tmp_path):
    data = pixels(300, 200, 3, "float32", seed=7)
    data[:, :50, :60] = np.nan
    path = write_raster(tmp_path / "float.tif", data, nodata=float("nan"))
    with open_scene(path, normalize=NormalizeConfig(fill=7)) as scene:
        assert np.isnan(scene.nodata)
        window = scene.read_window(0, 0, 300, 200)
        assert all(np.isfinite(scene.stretch.low + scene.stretch.high))
    assert (window[:50, :60] == 7).all()
    np.testing.assert_array_equal(window[50:, 60:], hwc(scene.stretch.apply(data[:, 50:, 60:])))


def test_uint8_nodata_fills_pixels_where_every_band_is_nodata(tmp_path):
    data = pixels(256, 256, 3, "uint8", seed=8)
    data[:, :10, :] = 0
    data[0, 20:30, :] = 0  # only red is 0 there: valid data
    path = write_raster(tmp_path / "nodata.tif", data, nodata=0)
    with open_scene(path, normalize=NormalizeConfig(fill=7)) as scene:
        window = scene.read_window(0, 0, 256, 256)
    assert (window[:10] == 7).all()
    np.testing.assert_array_equal(window[10:], hwc(data)[10:])


def test_nodata_override_applies_to_a_scene_without_nodata(tmp_path):
    data = pixels(128, 128, 3, "uint8", seed=9)
    data[:, :8] = 255
    path = write_raster(tmp_path / "plain.tif", data)
    with open_scene(path, normalize=NormalizeConfig(nodata=255, fill=3)) as scene:
        assert scene.nodata == 255
        assert (scene.read_window(0, 0, 128, 8) == 3).all()


def test_rgba_alpha_masks_transparent_pixels(tmp_path):
    data = np.concatenate([pixels(300, 200, 3, "uint8", seed=10), np.full((1, 200, 300), 255, np.uint8)])
    data[3, :, :100] = 0
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    path = write_raster(tmp_path / "rgba.tif", data, colorinterp=interp)
    with open_scene(path, normalize=NormalizeConfig(fill=9)) as scene:
        assert scene.bands == (1, 2, 3)
        window = scene.read_window(0, 0, 300, 200)
        view = scene.read_view(150)
    assert (window[:, :100] == 9).all()
    np.testing.assert_array_equal(window[:, 100:], hwc(data[:3])[:, 100:])
    assert (view[:, :50] == 9).all() and (view[:, 51:] != 9).any()


def test_internal_mask_band_is_honoured(tmp_path):
    data = pixels(400, 300, 3, "uint8", seed=12)
    mask = np.full((300, 400), 255, np.uint8)
    mask[:100, :100] = 0
    path = tmp_path / "masked.tif"
    profile = {"driver": "COG", "width": 400, "height": 300, "count": 3, "dtype": "uint8", "crs": CRS}
    with rasterio.open(path, "w", transform=TRANSFORM, BLOCKSIZE=256, **profile) as ds:
        ds.write(data)
        ds.write_mask(mask)
    with open_scene(path, normalize=NormalizeConfig(fill=5)) as scene:
        window = scene.read_window(0, 0, 400, 300)
    assert (window[:100, :100] == 5).all()
    np.testing.assert_array_equal(window[100:], hwc(data)[100:])


def test_side_car_mask_overviews_and_georeferencing_of_a_local_scene_are_read(tmp_path):
    """`.msk`, `.ovr` and `.aux.xml` beside a local file belong to it (an object store's are not looked for)."""
    data = pixels(600, 400, 3, "uint8", seed=13)
    mask = np.full((400, 600), 255, np.uint8)
    mask[:, :200] = 0
    path = tmp_path / "tiled.tif"
    profile = {"driver": "GTiff", "width": 600, "height": 400, "count": 3, "dtype": "uint8", "tiled": True, "crs": CRS}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK="NO"), rasterio.open(
        path, "w", transform=TRANSFORM, blockxsize=256, blockysize=256, **profile
    ) as ds:
        ds.write(data)
        ds.write_mask(mask)
    with rasterio.Env(TIFF_USE_OVR="YES"), rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.average)
    png = tmp_path / "scene.png"
    write_raster(png, data, driver="PNG")  # georeferenced: CRS and transform go to scene.png.aux.xml
    assert {"scene.png.aux.xml", "tiled.tif.msk", "tiled.tif.ovr"} <= {p.name for p in tmp_path.iterdir()}
    with open_scene(path, normalize=NormalizeConfig(fill=5)) as scene:
        assert scene.overviews == [2, 4]
        window = scene.read_window(0, 0, 600, 400)
        view = scene.read_view(150)
    assert (window[:, :200] == 5).all()
    np.testing.assert_array_equal(window[:, 200:], hwc(data)[:, 200:])
    assert (view[:, :50] == 5).all()
    with open_scene(png) as scene:
        assert scene.crs == rasterio.crs.CRS.from_string(CRS) and scene.footprint is not None


def test_four_band_rgbn_shows_rgb_by_default_and_maps_false_colour(tmp_path):
    data = pixels(256, 256, 4, "uint8", seed=13)
    path = write_raster(tmp_path / "rgbn.tif", data)
    # Nothing says which band is which: bands 1-3 are shown, and the scene says so.
    with pytest.warns(SceneWarning, match=r"4 bands, none marked red/green/blue .* set normalize.bands"), open_scene(path) as scene:
        assert scene.count == 4 and scene.bands == (1, 2, 3)
        np.testing.assert_array_equal(scene.read_window(0, 0, 256, 256), hwc(data[:3]))
    with open_scene(path, normalize=NormalizeConfig(bands=(4, 3, 2))) as scene:
        np.testing.assert_array_equal(scene.read_window(0, 0, 256, 256), hwc(data[[3, 2, 1]]))
    with open_scene(path, normalize=NormalizeConfig(bands=(4,))) as scene:
        assert (scene.read_window(0, 0, 256, 256)[..., 1] == data[3]).all()


def test_bgrn_bands_named_by_their_descriptions_are_shown_as_rgb(tmp_path):
    """A multispectral product in wavelength order (blue, green, red, NIR) that names its bands only
    in their descriptions: red, green, blue are found by name, without a warning."""
    data = pixels(128, 128, 4, "uint16", seed=19)
    path = tmp_path / "bgrn.tif"
    profile = {"driver": "GTiff", "width": 128, "height": 128, "count": 4, "dtype": "uint16", "crs": CRS, "transform": TRANSFORM}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        for band, name in enumerate(["Blue", "Green", "Red", "NIR"], start=1):
            ds.set_band_description(band, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SceneWarning)
        with open_scene(path) as scene:
            assert scene.bands == (3, 2, 1)
    with pytest.warns(SceneWarning, match="4 bands, none marked"):
        open_scene(write_raster(tmp_path / "unnamed.tif", data, driver="GTiff")).close()


def test_bgr_colour_interpretation_is_reordered_to_rgb(tmp_path):
    data = pixels(128, 128, 3, "uint8", seed=14)
    interp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    path = write_raster(tmp_path / "bgr.tif", data, driver="GTiff", colorinterp=interp)
    with open_scene(path) as scene:
        assert scene.bands == (3, 2, 1)
        np.testing.assert_array_equal(scene.read_window(0, 0, 128, 128), hwc(data[::-1]))


@pytest.mark.parametrize("driver", ["PNG", "JPEG"])
def test_plain_png_and_jpeg_files_are_scenes(tmp_path, driver):
    data = pixels(320, 240, 3, "uint8", seed=15)
    path = write_raster(tmp_path / f"photo.{driver.lower()}", data, driver=driver, georeferenced=False)
    with open_scene(path) as scene:
        assert scene.footprint is None and scene.crs is None
        window = scene.read_window(0, 0, 320, 240)
        assert scene.read_view(672).shape == (504, 672, 3)
    np.testing.assert_array_equal(window, decoded(path))
    if driver == "PNG":
        np.testing.assert_array_equal(window, hwc(data))


def test_palette_png_is_expanded_through_its_colour_map(tmp_path):
    indices = np.array([[[0, 1, 2, 1], [1, 1, 0, 2]]], dtype=np.uint8)
    colormap = {0: (0, 0, 0, 0), 1: (255, 0, 0, 255), 2: (0, 255, 0, 255)}
    path = write_raster(tmp_path / "palette.png", indices, driver="PNG", georeferenced=False, colormap=colormap)
    with open_scene(path, normalize=NormalizeConfig(fill=1)) as scene:
        window = scene.read_window(0, 0, 4, 2)
    assert window[0].tolist() == [[1, 1, 1], [255, 0, 0], [0, 255, 0], [255, 0, 0]]


def test_scene_without_overviews_or_tiles_warns_and_still_reads(tmp_path):
    data = pixels(4096, 64, 1, "uint8", seed=16)
    path = write_raster(tmp_path / "strip.tif", data, driver="GTiff")
    with pytest.warns(SceneWarning) as caught:
        scene = open_scene(path)
    messages = " ".join(str(warning.message) for warning in caught)
    assert "no overviews" in messages and "striped" in messages and str(path) in messages
    with scene:
        view = scene.read_view(1024)
    reference = resize_rgb(np.repeat(hwc(data), 3, axis=2), 1024, 16)
    assert np.abs(view.astype(np.int16) - reference).mean() < 1.0


def test_a_small_cog_opens_without_warnings(rgb_cog):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SceneWarning)
        open_scene(rgb_cog[0]).close()


def write_text(path, text):
    path.write_text(text)
    return path


def truncated_cog(tmp_path):
    # Overviews and headers come first in a COG: cutting the file leaves full-resolution tiles short.
    source = write_raster(tmp_path / "whole.tif", pixels(1024, 1024, 3, "uint8", seed=17))
    path = tmp_path / "truncated.tif"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


def header_only(tmp_path):
    source = write_raster(tmp_path / "whole.tif", pixels(512, 512, 3, "uint8", seed=18))
    path = tmp_path / "header.tif"
    path.write_bytes(source.read_bytes()[:300])
    return path


def complex_raster(tmp_path):
    path = tmp_path / "complex.tif"
    profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 1, "dtype": "complex64", "crs": CRS}
    with rasterio.open(path, "w", transform=TRANSFORM, **profile) as dataset:
        dataset.write(np.ones((1, 8, 8), np.complex64))
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp / "missing.tif", "no such file or object"),
        (lambda tmp: write_text(tmp / "notes.tif", "not a raster\n" * 100), "not a raster format GDAL can read"),
        (lambda tmp: write_text(tmp / "empty.tif", ""), "empty object (0 bytes)"),
        (header_only, "corrupt or truncated header"),
        (lambda tmp: tmp, "a directory, not a raster"),
        (complex_raster, "unsupported layout: complex64 data"),
    ],
)
def test_unreadable_scenes_raise_scene_error_naming_uri_and_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(SceneError) as caught:
        open_scene(path)
    assert str(caught.value).startswith(f"cannot read scene {path}: {reason}")
    assert caught.value.uri == str(path) and caught.value.reason.startswith(reason)


def test_truncated_cog_opens_then_fails_on_the_missing_tiles(tmp_path):
    path = truncated_cog(tmp_path)
    with open_scene(path) as scene:
        assert scene.read_view(128).shape == (128, 128, 3)  # served by the overviews, still present
        with pytest.raises(SceneError, match="corrupt or truncated raster data .*TIFF"):
            scene.read_window(0, 0, 1024, 1024)


def test_bad_band_mapping_and_unknown_scheme_are_scene_errors(rgb_cog):
    with pytest.raises(SceneError, match=r"bands \[5\] requested, the scene has 3"):
        open_scene(rgb_cog[0], normalize=NormalizeConfig(bands=(5, 1, 2)))
    with pytest.raises(SceneError, match=r"bands \[4\] requested, the scene has 3"):  # the first band past the end
        open_scene(rgb_cog[0], normalize=NormalizeConfig(bands=(3, 2, 4)))
    with pytest.raises(SceneError, match="cannot read scene ftp://host/a.tif: no GDAL reader for ftp://"):
        open_scene("ftp://host/a.tif")


def test_bad_arguments_and_closed_scenes_are_caller_errors(rgb_cog):
    scene = open_scene(rgb_cog[0])
    with pytest.raises(ValueError, match="window size must be positive"):
        scene.read_window(0, 0, 0, 10)
    with pytest.raises(ValueError, match="out_size must be positive"):
        scene.read_window(0, 0, 10, 10, out_size=(0, 5))
    with pytest.raises(ValueError, match="max_side must be positive"):
        scene.read_view(0)
    scene.close()
    with pytest.raises(ValueError, match="closed scene"):
        scene.read_window(0, 0, 10, 10)


def test_overview_reads_use_average_resampling_of_the_overview(rgb_cog):
    # read_view at an overview's exact size returns that overview's pixels.
    path, _ = rgb_cog
    with open_scene(path) as scene:
        view = scene.read_view(350)
    with rasterio.open(path, overview_level=0) as overview:
        stored = overview.read(resampling=Resampling.nearest)
    np.testing.assert_array_equal(view, hwc(stored))


MEMORY_PROBE = """
import sys, psutil
from uhr.scenes import open_scene
from uhr.scenes.benchmark import peak_rss
from uhr.storage import StorageConfig
scene = open_scene(sys.argv[1], storage=StorageConfig(gdal_cache_mb=32))
current = psutil.Process().memory_info().rss
view = scene.read_view(512)
print(view.shape, max(peak_rss() - current, 0))
"""


@pytest.mark.slow
def test_coarse_view_without_overviews_reads_in_bounded_memory(tmp_path):
    # 6144^2 RGB is 108 MiB decoded; the view must stream through GDAL's block cache (32 MiB here).
    data = pixels(6144, 6144, 3, "uint8", seed=19)
    path = write_raster(tmp_path / "flat.tif", data, overviews=False, compress="LZW")
    del data
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True
    )
    shape, growth = result.stdout.split(")")
    assert shape == "(512, 512, 3"
    assert int(growth) < 64 * 2**20, f"peak RSS grew by {int(growth) / 2**20:.0f} MiB"


@pytest.mark.parametrize("bands", [3, 4])
def test_strip_wise_decimation_equals_a_single_read(tmp_path, monkeypatch, bands):
    data = pixels(1200, 900, bands, "uint16", seed=20)
    data[:, :, :50] = 0
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha][:bands]
    if bands == 4:
        data[3] = np.where(np.arange(900)[:, None] < 300, 0, 65535)
    path = write_raster(tmp_path / "flat.tif", data, overviews=False, nodata=0, colorinterp=interp)
    with open_scene(path) as scene:
        whole_view, whole_window = scene.read_view(300), scene.read_window(100, 0, 1000, 900, out_size=(87, 101))
    # Strips of ~40 KiB decoded: dozens of reads with floating-point row edges.
    monkeypatch.setattr("uhr.scenes.reader._STRIP_BYTES", 40 * 1024)
    with open_scene(path) as scene:
        assert scene._strip_rows(scene._box, 225) < 20
        np.testing.assert_array_equal(scene.read_view(300), whole_view)
        np.testing.assert_array_equal(scene.read_window(100, 0, 1000, 900, out_size=(87, 101)), whole_window)
