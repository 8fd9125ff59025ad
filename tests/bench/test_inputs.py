"""Benchmark inputs: the real-geometry tiny model, its saved copy, cached scenes, strategy budgets."""

from __future__ import annotations

from uhr.bench.inputs import build_bench_model, cached_scene, saved_bench_model, strategy_config
from uhr.model import load_model_config
from uhr.model.pruning import PruningConfig, StrategyName


def test_the_model_has_clip_tiles_and_llava_next_grids():
    model, _ = build_bench_model()
    config = model.config
    assert (config.tile_size, config.patch_grid) == (336, 24)
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_saved_model_is_written_once_and_loads_with_the_same_geometry(tmp_path):
    path = saved_bench_model(tmp_path)
    written = (path / "config.json").stat().st_mtime_ns
    assert saved_bench_model(tmp_path) == path and (path / "config.json").stat().st_mtime_ns == written
    assert load_model_config(str(path)).patch_grid == 24
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging directory left


def test_cached_scene_is_generated_once_under_the_read_benchmarks_name(tmp_path):
    path = cached_scene(tmp_path, 512, seed=4)
    assert path == tmp_path / "synth_512_seed4_jpeg.tif"
    written = path.stat().st_mtime_ns
    assert cached_scene(tmp_path, 512, seed=4).stat().st_mtime_ns == written


def test_none_gets_the_budget_of_llava_nexts_largest_grid_others_the_default():
    config = build_bench_model()[0].config
    # 2 x 2 grid of a square scene: thumbnail 576 + 48 rows x (48 + newline).
    assert strategy_config("none", config, 8192, 8192).budget == 576 + 48 * 49
    for name in (StrategyName.DOWNSAMPLE, StrategyName.GEOLLAVA, StrategyName.UHR_BAT, StrategyName.C2F):
        assert strategy_config(name, config, 8192, 8192) == PruningConfig(strategy=name)
