"""The read benchmark end to end on a small synthetic scene (the job itself runs 8k and 32k)."""

from __future__ import annotations

import pytest

from uhr.scenes.benchmark import ReadBenchConfig, format_table, run_read_benchmark


@pytest.mark.slow
def test_read_benchmark_measures_bytes_at_the_server_and_rss(tmp_path):
    config = ReadBenchConfig(sizes=(2048,), windows=3, cache_dir=tmp_path)
    results = run_read_benchmark(config)
    assert [(r.size, r.source) for r in results] == [(2048, "s3"), (2048, "local")]
    remote, local = results
    assert 0 < remote.view_bytes < remote.object_bytes and remote.view_requests >= 1
    assert remote.windows_requests >= 3 and remote.windows_bytes > 0
    assert local.view_bytes is None and local.peak_rss >= local.baseline_rss > 0
    assert (tmp_path / "synth_2048_seed0_jpeg.tif").exists()
    table = format_table(results, config)
    assert table.count("\n| 2048^2 |") == 2 and "view bytes / object" in table
