"""Scenes in object storage, read from a real S3 API server (moto, own process) on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from uhr.errors import SceneError, SceneWarning
from uhr.scenes import open_scene
from uhr.scenes.metering import ReadMeter, gdal_downloaded_bytes
from uhr.scenes.windows import Box
from uhr.storage import StorageConfig
from uhr.testing.s3_server import FAKE_SECRET_ACCESS_KEY, FAKE_SHAPED_KEY_ID

from .data import pixels, write_raster


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.new_bucket("scenes")


@pytest.fixture(scope="module")
def remote_8k(s3_server, bucket, cog_8k) -> tuple[str, int]:
    """The 8k COG uploaded to the S3 server: (uri, object size in bytes)."""
    s3_server.client.upload_file(str(cog_8k), bucket, "archive/scene_8k.tif")
    return f"s3://{bucket}/archive/scene_8k.tif", cog_8k.stat().st_size


def test_coarse_view_of_an_8k_cog_fetches_a_small_fraction_of_the_object(s3_server, remote_8k):
    uri, size = remote_8k
    with s3_server.measure() as opening:
        scene = open_scene(uri)
    with scene, s3_server.measure() as viewing:
        view = scene.read_view(672)
    assert view.shape == (672, 672, 3) and view.any()
    # Measured at the server: the header plus the one overview the view comes from.
    assert opening.requests <= 2 and opening.bytes_sent <= 64 * 1024
    fraction = (opening.bytes_sent + viewing.bytes_sent) / size
    assert fraction <= 0.05, f"read_view(672) fetched {fraction:.1%} of the object"


def test_a_view_read_in_strips_fetches_only_its_overview(s3_server, remote_8k, cog_8k):
    """A 4032-px view decodes the 4096-px overview (48 MB) in strips; reading them top-down made
    GDAL fetch ahead past the overview into full-resolution tiles no strip needs."""
    uri, _ = remote_8k
    with rasterio.open(cog_8k, overview_level=0) as level:  # the 4096-px overview, as stored
        rows, cols = level.block_shapes[0]
        blocks = [(j, i) for j in range(-(-level.height // rows)) for i in range(-(-level.width // cols))]
        level_bytes = sum(level.block_size(1, j, i) for j, i in blocks)
    with open_scene(uri) as scene:
        assert scene._strip_rows(Box(0, 0, scene.width, scene.height), 4032) < 4032  # read in strips
        with s3_server.measure() as viewing:
            view = scene.read_view(4032)
    assert view.shape == (4032, 4032, 3)
    assert viewing.bytes_sent <= 1.05 * level_bytes + 64 * 1024, (viewing.bytes_sent, level_bytes)
    with open_scene(cog_8k) as local:  # strips or not, the pixels are a single read's
        np.testing.assert_array_equal(view, local.read_view(4032))


def test_windows_reuse_the_open_header_and_fetch_only_their_tiles(s3_server, remote_8k):
    uri, size = remote_8k
    with open_scene(uri) as scene:
        measurements = []
        for col_off in (1024, 3072, 5120):
            with s3_server.measure() as measurement:
                window = scene.read_window(col_off, 2048, 336, 336)
            assert window.shape == (336, 336, 3)
            measurements.append(measurement)
    # A 336-px window inside one 512-px tile row spans at most 2 x 1 tiles (JPEG, ~100-300 KB).
    for measurement in measurements:
        assert measurement.requests <= 2, "a window re-read the header"
        assert measurement.bytes_sent <= 0.02 * size


def test_remote_and_local_reads_are_identical(s3_server, bucket, tmp_path):
    data = pixels(1500, 1000, 3, "uint16", seed=21)
    path = write_raster(tmp_path / "u16.tif", data, nodata=200)
    s3_server.client.upload_file(str(path), bucket, "same/u16.tif")
    with open_scene(path) as local, open_scene(f"s3://{bucket}/same/u16.tif") as remote:
        assert remote.stretch == local.stretch
        assert (remote.width, remote.height, remote.overviews) == (local.width, local.height, local.overviews)
        assert remote.footprint.equals(local.footprint)
        np.testing.assert_array_equal(remote.read_view(672), local.read_view(672))
        for window in [(0, 0, 336, 336), (1300, 900, 336, 336), (-100, 500, 600, 300)]:
            np.testing.assert_array_equal(remote.read_window(*window), local.read_window(*window))
        np.testing.assert_array_equal(
            remote.read_window(10, 10, 1000, 800, out_size=(200, 250)),
            local.read_window(10, 10, 1000, 800, out_size=(200, 250)),
        )


@pytest.mark.parametrize(
    ("key", "body", "reason"),
    [
        ("missing.tif", None, "no such file or object"),
        ("empty.tif", b"", "empty object (0 bytes)"),
        ("notes.TIF", b"not a raster\n" * 100, "not a raster format GDAL can read"),
        ("scene", b"II*\x00" + b"\x00" * 100, "the name has none of the extensions GDAL may open remotely"),
    ],
)
def test_unreadable_objects_raise_scene_error_naming_uri_and_reason(s3_server, bucket, key, body, reason):
    if body is not None:
        s3_server.client.put_object(Bucket=bucket, Key=f"bad/{key}", Body=body)
    uri = f"s3://{bucket}/bad/{key}"
    with pytest.raises(SceneError) as caught:
        open_scene(uri)
    assert str(caught.value).startswith(f"cannot read scene {uri}: {reason}")


def test_missing_bucket_is_a_missing_object(s3_server):
    with pytest.raises(SceneError, match="no-such-bucket-for-uhr/a.tif: no such file or object"):
        open_scene("s3://no-such-bucket-for-uhr/a.tif")


def test_truncated_remote_cog_fails_on_read_with_the_reason(s3_server, bucket, tmp_path):
    source = write_raster(tmp_path / "whole.tif", pixels(1024, 1024, 3, "uint8", seed=22))
    s3_server.client.put_object(Bucket=bucket, Key="bad/cut.tif", Body=source.read_bytes()[:40_000])
    with open_scene(f"s3://{bucket}/bad/cut.tif") as scene:
        # A short read of an object: GDAL cannot tell a dropped connection from a cut object.
        with pytest.raises(SceneError, match="cut.tif: read failed: network error or truncated object"):
            scene.read_window(0, 0, 1024, 1024)


def test_an_unreachable_endpoint_is_a_network_error(bucket):
    storage = StorageConfig(endpoint_url="http://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(SceneError, match="network error while opening"):
        open_scene(f"s3://{bucket}/archive/scene_8k.tif", storage=storage)


def test_bytes_are_metered_per_object_whichever_protocol_came_first(s3_server, bucket, tmp_path):
    """GDAL keeps one statistics entry per network handler (vsis3, vsicurl) used in the process."""
    path = write_raster(tmp_path / "metered.tif", pixels(1024, 1024, 3, "uint8", seed=23))
    for key in ("metered/a.tif", "metered/b.tif"):
        s3_server.client.upload_file(str(path), bucket, key)
    signed = s3_server.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "metered/b.tif"})
    for uri in (f"s3://{bucket}/metered/a.tif", signed):
        with s3_server.measure() as served, ReadMeter(uri) as meter, open_scene(uri) as scene:
            scene.read_view(256)
        assert meter.bytes == served.bytes_sent > 0, uri


def test_gdal_counters_are_emptied_once_no_meter_counts(s3_server, bucket, tmp_path):
    """GDAL keeps a counter per object read for the process's life: a long-lived worker must not pile them up."""
    path = write_raster(tmp_path / "counted.tif", pixels(1024, 1024, 3, "uint8", seed=29))
    first, second = (f"s3://{bucket}/counters/{name}.tif" for name in ("a", "b"))
    for uri in (first, second):
        s3_server.client.upload_file(str(path), bucket, uri.split(f"{bucket}/", 1)[1])
    with ReadMeter(first) as outer:
        with s3_server.measure() as served_inner, ReadMeter(second) as inner, open_scene(second) as scene:
            scene.read_view(256)
        assert gdal_downloaded_bytes(second) == inner.bytes  # the outer meter still counts: nothing emptied yet
        with s3_server.measure() as served_outer, open_scene(first) as scene:
            scene.read_view(256)
    assert inner.bytes == served_inner.bytes_sent > 0 and outer.bytes == served_outer.bytes_sent > 0
    assert gdal_downloaded_bytes(first) == gdal_downloaded_bytes(second) == 0


def test_credentials_in_uris_never_reach_the_message(s3_server, bucket):
    signed = (
        f"{s3_server.endpoint_url}/{bucket}/bad/missing.tif"
        f"?X-Amz-Credential={FAKE_SHAPED_KEY_ID}%2F20250101&X-Amz-Signature=uhr-not-a-real-signature"
    )
    with_user = s3_server.endpoint_url.replace("http://", "http://uhr-not-a-real-user:uhr-not-a-real-password@") + f"/{bucket}/x.tif"
    for uri, secrets in [(signed, [FAKE_SHAPED_KEY_ID, "uhr-not-a-real-signature"]), (with_user, ["uhr-not-a-real-password"])]:
        with pytest.raises(SceneError) as caught:
            open_scene(uri)
        text = f"{caught.value} {caught.value.uri} {caught.value.reason} {caught.value!r}"
        assert "cannot read scene" in text
        for secret in secrets:
            assert secret not in text
    # The secret key of the environment never shows, even when GDAL or botocore echo it.
    with pytest.raises(SceneError) as caught:
        open_scene(f"s3://{bucket}/{FAKE_SECRET_ACCESS_KEY}.tif")
    assert FAKE_SECRET_ACCESS_KEY not in str(caught.value)


def test_a_stretch_handed_over_spares_a_window_read_the_statistics(s3_server, bucket, tmp_path):
    # uint16 without overviews: the statistics view touches every tile, the window only a few.
    path = write_raster(tmp_path / "u16.tif", pixels(1024, 1024, 3, "uint16", seed=21), overviews=False, blocksize=128)
    s3_server.client.upload_file(str(path), bucket, "u16/scene.tif")
    uri, size = f"s3://{bucket}/u16/scene.tif", path.stat().st_size
    storage = s3_server.storage()
    with ReadMeter(uri) as computed, open_scene(uri, storage=storage) as scene:
        stretch = scene.stretch
        expected = scene.read_window(512, 512, 100, 100)
    with ReadMeter(uri) as handed, open_scene(uri, storage=storage, stretch=stretch) as scene:
        window = scene.read_window(512, 512, 100, 100)
    np.testing.assert_array_equal(window, expected)
    assert computed.bytes > 0.9 * size and handed.bytes < 0.2 * size


def test_side_car_overviews_and_mask_are_used_when_the_storage_asks_for_them(s3_server, bucket, tmp_path):
    """An older GeoTIFF delivery: overviews in scene.tif.ovr, the mask in scene.tif.msk. By default
    no side-car is looked for (the warning says how); with the option, both are found, over the
    scene's own endpoint (GDAL looks for them once the open dataset is first inspected)."""
    path = tmp_path / "sidecars.tif"
    side = 2400
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False, TIFF_USE_OVR=True):
        with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", tiled=True) as ds:
            ds.write(np.full((3, side, side), 100, np.uint8))
            mask = np.full((side, side), 255, np.uint8)
            mask[:, : side // 3] = 0
            ds.write_mask(mask)
        with rasterio.open(path, "r+") as ds:
            ds.build_overviews([2, 4, 8])
    for sidecar in sorted(tmp_path.glob("sidecars.tif*")):
        s3_server.client.upload_file(str(sidecar), bucket, f"sidecars/{sidecar.name}")
    uri = f"s3://{bucket}/sidecars/sidecars.tif"

    with pytest.warns(SceneWarning, match=r"no overviews: .*side-car \.ovr and \.msk files are not looked for"):
        with open_scene(uri) as scene:
            assert scene.overviews == [] and (scene.read_view(300) == 100).all()

    options = {"GDAL_DISABLE_READDIR_ON_OPEN": "TRUE", "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.ovr,.msk"}
    storage = StorageConfig(gdal_options=options)
    with s3_server.measure() as reading, open_scene(uri, storage=storage) as scene:
        view = scene.read_view(300)
    assert scene.overviews == [2, 4, 8]
    assert (view[:, :100] == 0).all() and (view[:, 100:] == 100).all()  # masked third filled
    assert reading.bytes_sent < 0.1 * path.stat().st_size  # from the .ovr, not the full resolution
