"""The VQA benchmark end to end on small scenes (the job itself runs 4 x 8192^2 and one 32768^2)."""

from __future__ import annotations

import pytest

from uhr.bench.vqa import VqaBenchConfig, format_report, run_vqa_benchmark


@pytest.mark.slow
def test_vqa_benchmark_reports_every_figure_against_its_target(tmp_path):
    config = VqaBenchConfig(
        scenes=2,
        questions=2,
        size=1024,
        strategies=["uhr-bat", "c2f"],
        max_new_tokens=2,
        rss_size=2048,
        rss_strategies=["c2f"],
        cache_dir=tmp_path,
    )
    result = run_vqa_benchmark(config)
    assert [r.strategy for r in result.runs] == ["uhr-bat", "c2f"]
    for run in result.runs:
        assert run.rows == 4 and run.errors == 0 and run.scenes == 2
        # GDAL's counters in the workers and the server's own count agree on what was read (rows carry
        # a scene's bytes split evenly over its questions, rounded to whole bytes).
        assert run.bytes_read > 0 and abs(run.bytes_read - run.server_bytes) <= run.rows
        assert 0 < run.running_s <= run.wall_s
    assert result.baseline is not None and result.baseline.questions == 4
    assert [s.tiles for s in result.baseline.scenes] == [144, 144]
    # Once running, the slowest stage is busy most of its span: reads keep ahead of the encode actor.
    assert all(0 < run.slowest_busy <= 1.0 and run.wall_over_slowest >= 1.0 for run in result.runs)
    (rss,) = result.rss
    assert rss.size == 2048 and rss.peak_worker.peak_rss > 0
    report = format_report(result)
    for heading in ("## Naive baseline", "## Peak RSS", "## Targets"):
        assert heading in report
    assert "c2f bytes read / object bytes" in report and "wall / slowest stage (uhr-bat" in report
