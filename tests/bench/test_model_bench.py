"""The model benchmark end to end on a small scene (the job itself runs 8192^2)."""

from __future__ import annotations

import pytest

from uhr.bench.inputs import build_bench_model, cached_scene, strategy_config
from uhr.bench.model import ModelBenchConfig, estimated_seconds, format_report, partition_at_real_width, run_model_benchmark
from uhr.model.pruning import StrategyName


@pytest.mark.slow  # ~30 s of the five strategies; the job itself is what users run
def test_model_benchmark_runs_every_strategy_and_reports_measured_and_priced_figures(tmp_path):
    config = ModelBenchConfig(size=1024, questions=2, max_new_tokens=2, cache_dir=tmp_path)
    results = run_model_benchmark(config)
    assert [r.strategy for r in results] == ["none", "downsample", "geollava", "uhr-bat", "c2f"]
    for r in results:
        assert 0 < r.kept <= r.budget and r.kept <= r.dense
        assert r.one_question_s > 0 and r.many_questions_s > 0 and r.encode_s > 0
        assert r.workload["encode"].tiles > 0 and r.workload["answer"].answers == [round(r.kept)] * 2
    by_name = {r.strategy: r for r in results}
    # Query-guided strategies run the LM over the anchor tokens once and each question over them; the others nothing.
    assert by_name["uhr-bat"].workload["select"].importance == by_name["uhr-bat"].workload_one["select"].importance
    assert len(by_name["uhr-bat"].workload["select"].importance_questions) == 2
    assert by_name["downsample"].workload["select"].importance == []
    gpu = config.gpus[-1]
    # Query-independent selections are shared whole; c2f's questions share the thumbnail before their own tokens.
    for name in ("none", "downsample", "geollava"):
        assert by_name[name].shared == round(by_name[name].kept)
    assert 0 < by_name["c2f"].shared < by_name["c2f"].kept
    for name in ("none", "c2f"):
        assert estimated_seconds(by_name[name], gpu, config, many=True, share=True) < estimated_seconds(
            by_name[name], gpu, config, many=True
        )
    for r in results:  # the second question costs something, never more than the first
        one = estimated_seconds(r, gpu, config, many=False)
        assert one < estimated_seconds(r, gpu, config, many=True) <= 2 * one
    report = format_report(results, config)
    for name in by_name:
        assert report.count(f"| {name} |") == 2  # measured and priced rows
    assert "Against the published figures" in report and "UHR-BAT dense tokens" in report
    assert "region partition at the real tower width" in report
    assert [r.strategy for r in results if r.partition is not None] == ["uhr-bat"]


def test_uhr_bat_partition_is_timed_on_every_scale_at_clip_l_width(tmp_path):
    """Every token of every scale is partitioned, in embeddings of CLIP ViT-L's width + 2 coordinates."""
    path = cached_scene(tmp_path, 1024, 0)
    model, _ = build_bench_model()
    pruning = strategy_config(StrategyName.UHR_BAT, model.config, 1024, 1024)
    cost = partition_at_real_width(model, pruning, path)
    # 672 px: 2 x 2 tiles of 24 x 24 tokens; 1344 px clamped to the scene's 1024: 74 valid 14-px
    # tokens a side (the rest of its 4 x 4 tiles is padding).
    assert cost.sides == [672, 1024] and cost.tokens == [48 * 48, 74 * 74] and cost.width == 1026
    assert all(s > 0 for s in cost.seconds) and cost.total_s == sum(cost.seconds)
