"""Synthetic scenes: determinism, COG structure, georeferencing, truth agreeing with pixels."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp

from uhr.synth import PALETTE, LandCover, ObjectClass, SceneTruth, plan_scene, render_window, write_scene
from uhr.synth.landcover import LABEL
from uhr.synth.objects import GLASS_RGB, rasterize
from uhr.synth.scene import UINT16_GAIN, UINT16_OFFSET, overview_factors

SIZE = 1024
SEED = 5


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, SceneTruth]:
    path = str(tmp_path_factory.mktemp("scene") / "scene.tif")
    return path, write_scene(path, SIZE, SEED)


def read(path: str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def tiff_layout(path: str) -> tuple[bytes, list[int], list[int]]:
    """(bytes after the header, IFD offsets in chain order, all tile offsets) of a (Big)TIFF."""
    with open(path, "rb") as handle:
        data = handle.read()
    order = {b"II": "<", b"MM": ">"}[data[:2]]
    magic = struct.unpack(order + "H", data[2:4])[0]
    big = magic == 43
    entry_size, count_format, entry_format, next_format = (
        (20, "Q", "HHQQ", "Q") if big else (12, "H", "HHII", "I")
    )
    offset = struct.unpack(order + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    header_end = 16 if big else 8
    type_sizes = {3: 2, 4: 4, 16: 8}
    ifds: list[int] = []
    tiles: list[int] = []
    while offset:
        ifds.append(offset)
        count_size = struct.calcsize(order + count_format)
        (count,) = struct.unpack(order + count_format, data[offset : offset + count_size])
        for k in range(count):
            start = offset + count_size + k * entry_size
            tag, kind, n, value = struct.unpack(order + entry_format, data[start : start + entry_size])
            if tag == 324:  # TileOffsets
                item = type_sizes[kind]
                inline = n * item <= (8 if big else 4)
                where = start + 4 + (8 if big else 4) if inline else value
                fmt = {2: "H", 4: "I", 8: "Q"}[item]
                tiles.extend(struct.unpack(order + fmt * n, data[where : where + n * item]))
        end = offset + count_size + count * entry_size
        (offset,) = struct.unpack(order + next_format, data[end : end + struct.calcsize(order + next_format)])
    return data[header_end : header_end + 400], ifds, tiles


def test_scene_is_a_cloud_optimized_geotiff(scene: tuple[str, SceneTruth]) -> None:
    path, truth = scene
    with rasterio.open(path) as src:
        assert src.driver == "GTiff"
        assert (src.width, src.height, src.count, src.dtypes[0]) == (SIZE, SIZE, 3, "uint8")
        assert src.block_shapes == [(512, 512)] * 3
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.compression.value == "DEFLATE"
        assert src.overviews(1) == overview_factors(SIZE, SIZE) == [2, 4]
        assert max(src.width, src.height) // src.overviews(1)[-1] < 512
        assert src.colorinterp == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        # Overviews are internal: GDAL found no side-car file.
        assert src.files == [path]
    ghost, ifds, tiles = tiff_layout(path)
    assert b"LAYOUT=IFDS_BEFORE_DATA" in ghost
    assert len(ifds) == 3  # full resolution and two overviews
    assert max(ifds) < min(t for t in tiles if t)


def test_scene_is_georeferenced_in_utm(scene: tuple[str, SceneTruth]) -> None:
    path, truth = scene
    with rasterio.open(path) as src:
        epsg = src.crs.to_epsg()
        assert 32631 <= epsg <= 32636 and f"EPSG:{epsg}" == truth.crs
        assert src.crs.linear_units == "metre"
        assert src.transform == rasterio.Affine(*truth.transform)
        assert src.transform.a == -src.transform.e and 0.3 <= src.transform.a <= 1.0
        assert src.transform.b == src.transform.d == 0
        left, bottom, right, top = src.bounds
        assert 160_000 <= left < right <= 840_000 and 0 < bottom < top < 9_330_000


def test_same_seed_gives_identical_bytes_and_truth(tmp_path, scene: tuple[str, SceneTruth]) -> None:
    path, truth = scene
    again = write_scene(str(tmp_path / "again.tif"), SIZE, SEED)
    assert again.to_dict() == truth.to_dict()
    assert (tmp_path / "again.tif").read_bytes() == open(path, "rb").read()


def test_different_seed_gives_a_different_scene(scene: tuple[str, SceneTruth]) -> None:
    path, truth = scene
    other = plan_scene(SIZE, SEED + 1)
    assert other.to_dict() != truth.to_dict()
    assert not np.array_equal(render_window(other, 0, 0, 256, 256), read(path)[:, :256, :256])


def test_block_size_does_not_change_pixels(tmp_path, scene: tuple[str, SceneTruth]) -> None:
    path, _ = scene
    write_scene(str(tmp_path / "big_blocks.tif"), SIZE, SEED, block_size=1024)
    np.testing.assert_array_equal(read(str(tmp_path / "big_blocks.tif")), read(path))
    # Any window renders what the file holds there, whatever its alignment.
    truth = plan_scene(SIZE, SEED)
    np.testing.assert_array_equal(render_window(truth, 301, 77, 219, 450), read(path)[:, 77:527, 301:520])


def test_objects_are_where_the_truth_says_and_nowhere_else(scene: tuple[str, SceneTruth]) -> None:
    path, truth = scene
    pixels = read(path).transpose(1, 2, 0)
    background = render_window(dataclasses.replace(truth, objects=[]), 0, 0, SIZE, SIZE).transpose(1, 2, 0)
    assert len(truth.objects) >= 5
    changed = (pixels != background).any(axis=-1)
    covered = np.zeros_like(changed)
    for obj in truth.objects:
        x0, y0, x1, y1 = obj.bbox
        covered[y0:y1, x0:x1] = True
        body, glass = rasterize(obj.cls, obj.centre, obj.size_px, obj.rotation_deg, obj.bbox)
        inside = pixels[y0:y1, x0:x1]
        # The tight box: the body reaches all four sides.
        assert body[0].any() and body[-1].any() and body[:, 0].any() and body[:, -1].any()
        assert (inside[body & ~glass] == PALETTE[obj.colour]).all(), obj
        assert (inside[glass] == GLASS_RGB).all(), obj
        assert obj.size_px >= 8 and (obj.cls is not ObjectClass.CAR or glass.any())
    assert not (changed & ~covered).any()


def test_objects_stand_on_their_host_land_cover(scene: tuple[str, SceneTruth]) -> None:
    _, truth = scene
    hosts = {ObjectClass.SHIP: LandCover.WATER, ObjectClass.CAR: LandCover.URBAN}
    for obj in truth.objects:
        x0, y0, x1, y1 = obj.bbox
        labels = truth.landcover.labels(x0, y0, x1 - x0, y1 - y0)
        expected = hosts.get(obj.cls, LandCover.BARE_SOIL)
        assert (labels == LABEL[expected]).all(), obj
        if obj.cls is ObjectClass.CAR:
            body, _ = rasterize(obj.cls, obj.centre, obj.size_px, obj.rotation_deg, obj.bbox)
            assert truth.landcover.road_mask(x0, y0, x1 - x0, y1 - y0)[body].all()


def test_land_cover_labels_match_the_texture(scene: tuple[str, SceneTruth]) -> None:
    path, truth = scene
    pixels = read(path).transpose(1, 2, 0).astype(float)
    labels = truth.landcover.labels(0, 0, SIZE, SIZE)
    mean = {cover: pixels[labels == LABEL[cover]].mean(axis=0) for cover in LandCover if (labels == LABEL[cover]).any()}
    red, green, blue = mean[LandCover.WATER]
    assert blue > green > red
    red, green, blue = mean[LandCover.FOREST]
    assert green > red and green > blue and green < 100
    red, green, blue = mean[LandCover.BARE_SOIL]
    assert red > green > blue
    fractions = np.bincount(labels.ravel(), minlength=5) / labels.size
    assert fractions.max() < 0.8  # several covers, no single blanket
    np.testing.assert_allclose(fractions, [truth.landcover_fractions[c.value] for c in LandCover], atol=0.02)


def test_truth_round_trips_through_json(scene: tuple[str, SceneTruth]) -> None:
    _, truth = scene
    restored = SceneTruth.from_dict(json.loads(json.dumps(truth.to_dict())))
    assert restored.to_dict() == truth.to_dict()
    assert restored.size == (SIZE, SIZE)
    np.testing.assert_array_equal(render_window(restored, 500, 500, 100, 100), render_window(truth, 500, 500, 100, 100))


@pytest.mark.parametrize(("dtype", "bands"), [("uint16", 3), ("uint8", 4), ("uint16", 4), ("uint8", 1)])
def test_radiometry_and_band_options(tmp_path, scene: tuple[str, SceneTruth], dtype: str, bands: int) -> None:
    path = str(tmp_path / "scene.tif")
    truth = write_scene(path, (512, 384), SEED, dtype=dtype, bands=bands)
    rgb_truth = plan_scene((512, 384), SEED)
    reference = render_window(rgb_truth, 0, 0, 512, 384).astype(float)  # 8-bit RGB of the same scene
    with rasterio.open(path) as src:
        assert (src.count, src.dtypes[0], src.width, src.height) == (bands, dtype, 512, 384)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.overviews(1) == [2]
        pixels = src.read().astype(float)
        interp = src.colorinterp
        descriptions = src.descriptions
    assert truth.objects == rgb_truth.objects
    levels = (pixels - UINT16_OFFSET) / UINT16_GAIN if dtype == "uint16" else pixels
    if dtype == "uint16":
        assert pixels.max() > 255
    if bands == 1:
        assert interp == (ColorInterp.gray,) and descriptions == ("pan",)
        luminance = 0.299 * reference[0] + 0.587 * reference[1] + 0.114 * reference[2]
        assert np.abs(levels[0] - luminance).max() <= 1.0
        return
    assert np.abs(levels[:3] - reference).max() <= 0.5
    if bands == 4:
        assert interp[3] == ColorInterp.undefined and descriptions[3] == "nir"
        labels = truth.landcover.labels(0, 0, 512, 384)
        nir = levels[3]
        for bright in (LandCover.FOREST, LandCover.FARMLAND):
            if (labels == LABEL[bright]).any() and (labels == LABEL[LandCover.WATER]).any():
                assert nir[labels == LABEL[bright]].mean() > 3 * nir[labels == LABEL[LandCover.WATER]].mean()


def test_jpeg_option_gives_a_smaller_cog_with_recognisable_colours(tmp_path, scene: tuple[str, SceneTruth]) -> None:
    path, truth = scene
    jpeg = str(tmp_path / "jpeg.tif")
    write_scene(jpeg, SIZE, SEED, compress="jpeg")
    with rasterio.open(jpeg) as src:
        assert src.compression.value == "JPEG"
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        pixels = src.read().transpose(1, 2, 0).astype(float)
    assert (tmp_path / "jpeg.tif").stat().st_size < 0.5 * open(path, "rb").seek(0, 2)
    big = [obj for obj in truth.objects if obj.size_px >= 20 and obj.cls is not ObjectClass.CAR]
    assert big
    for obj in big:
        body, _ = rasterize(obj.cls, obj.centre, obj.size_px, obj.rotation_deg, obj.bbox)
        x0, y0, x1, y1 = obj.bbox
        observed = np.median(pixels[y0:y1, x0:x1][body], axis=0)
        nearest = min(PALETTE, key=lambda name: np.abs(np.asarray(PALETTE[name]) - observed).sum())
        assert nearest == obj.colour


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 64}, "width"),
        ({"size": (1024, 100_000)}, "height"),
        ({"seed": -1}, "seed"),
        ({"dtype": "float32"}, "dtype"),
        ({"bands": 2}, "bands"),
        ({"dtype": "uint16", "compress": "jpeg"}, "JPEG"),
        ({"compress": "lzw"}, "lzw"),
        ({"block_size": 700}, "block_size"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path, kwargs: dict, message: str) -> None:
    arguments = {"size": 256, "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        write_scene(str(tmp_path / "bad.tif"), arguments.pop("size"), arguments.pop("seed"), **arguments)
    assert not (tmp_path / "bad.tif").exists()


def test_gdal_paths_are_refused_as_targets() -> None:
    with pytest.raises(ValueError, match="s3:// URI, not a GDAL path"):
        write_scene("/vsis3/bucket/scene.tif", 256, 1)
