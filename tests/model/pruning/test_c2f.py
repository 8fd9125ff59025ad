"""LRS-VQA coarse-to-fine: pyramid geometry, planted zooms, budget rules and the fine-tile cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from uhr.model.pruning.c2f import (
    C2FEncoding,
    CoarseToFineStrategy,
    Level,
    coarse_to_fine,
    keep_count,
    pool_tiles,
    pyramid_sides,
    tiles_covering,
)
from uhr.model.pruning.config import PruningConfig
from uhr.scenes.source import ArraySource, fit_longest_side

TILE, CELLS = 32, 4  # pooled tokens per tile side (8 x 8 patches pooled by 2)


class CountingSource(ArraySource):
    """A real in-memory source that counts the windows and views read from it."""

    def __init__(self, image: np.ndarray):
        super().__init__(image)
        self.windows: list[tuple[int, int, int, int]] = []
        self.views: list[int] = []

    def read_view(self, max_side: int) -> np.ndarray:
        self.views.append(max_side)
        return super().read_view(max_side)

    def read_window(self, col_off, row_off, width, height, out_size=None):
        self.windows.append((col_off, row_off, width, height))
        return super().read_window(col_off, row_off, width, height, out_size=out_size)


# -- geometry ------------------------------------------------------------------------------------


def test_pyramid_sides_halve_down_to_the_base():
    assert pyramid_sides(7099, 1008) == [1008, 1775, 3550, 7099]
    assert pyramid_sides(2016, 1008) == [1008, 2016]  # the halving hits the base exactly
    assert pyramid_sides(500, 1008) == [500]  # small scenes: one level, at full resolution


def lrs_vqa_level(width: int, height: int, ratio: float, tile: int) -> tuple[int, int]:
    """(w, h) of LRS-VQA's pyramid level at `ratio`, by its released rule (reference/methods.md)."""
    w, h = round(width * ratio), round(height * ratio)
    scale = min(math.ceil(h / tile) * tile / h, math.ceil(w / tile) * tile / w)
    return round(w * scale), round(h * scale)


def test_levels_are_enlarged_to_fill_their_tiles_as_lrs_vqa_does():
    sides = pyramid_sides(7099, 1008)
    ratios = [1008 / 7099, 0.25, 0.5, 1.0]
    for side, ratio in zip(sides, ratios):
        level = Level.of(7099, 6329, side, 336, 12)
        theirs = lrs_vqa_level(7099, 6329, ratio, 336)
        assert (level.cols, level.rows) == (math.ceil(theirs[0] / 336), math.ceil(theirs[1] / 336))
        assert abs(level.width - theirs[0]) <= 1 and abs(level.height - theirs[1]) <= 1
        assert level.width == level.cols * 336 or level.height == level.rows * 336  # one side fills its tiles
    level = Level.of(7099, 6329, 1775, 336, 12)
    assert (level.width, level.height, level.rows, level.cols) == (1884, 1680, 5, 6)  # LRS-VQA: 1885 x 1680
    finest = Level.of(8192, 8192, 8192, 336, 12)
    assert (finest.width, finest.rows) == (8400, 25)  # upsampled by 2.5%, as LRS-VQA's is
    assert Level.of(8192, 8192, 1008, 336, 12).width == 1008  # the base already fills 3 x 3 tiles


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20_000), st.integers(1, 20_000), st.integers(1, 4096), st.sampled_from([14, 32, 336]))
def test_an_enlarged_level_keeps_its_tile_grid_and_fills_one_side(width, height, side, tile):
    plain_w, plain_h = fit_longest_side(width, height, side)
    level = Level.of(width, height, side, tile, 1)
    assert (level.cols, level.rows) == (math.ceil(plain_w / tile), math.ceil(plain_h / tile))
    assert level.width >= plain_w and level.height >= plain_h
    # LRS-VQA's factor fills one side exactly; keeping the aspect-kept resize may leave it a pixel short.
    assert level.cols * tile - level.width <= 1 or level.rows * tile - level.height <= 1


def test_level_windows_and_token_validity():
    full = Level.of(100, 40, 100, TILE, CELLS)  # enlarged by 1.28 to fill four tiles across
    assert (full.width, full.height, full.rows, full.cols) == (128, 51, 2, 4)
    assert full.window(1, 3) == (75, 25, 25, 25)  # 25 scene px a tile; past the scene's 40 rows it reads zeros
    half = Level.of(100, 70, 50, TILE, CELLS)
    assert (half.width, half.height) == (64, 45) and half.window(0, 1) == (50, 0, 50, 50)
    tokens = full.tokens(torch.tensor([[1, 3]]))
    # tile (1, 3) holds level rows 32..64 of 51: its 8-px cell rows 4, 5, 6 are valid, row 7 only padding
    assert tokens.row.tolist() == [4] * 4 + [5] * 4 + [6] * 4 and tokens.col.tolist() == [12, 13, 14, 15] * 3
    assert tokens.box[0].tolist() == pytest.approx([75.0, 32 * 40 / 51, 75.0 + 8 * 100 / 128, 40 * 40 / 51])


def test_tiles_covering_counts_positive_overlap_only():
    level = Level.of(256, 256, 128, TILE, CELLS)  # tiles of 64 scene px
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [60.0, 70.0, 70.0, 80.0], [192.0, 192.0, 256.0, 256.0]])
    assert tiles_covering(boxes, level).tolist() == [[0, 0], [1, 0], [1, 1], [3, 3]]


def test_keep_count_floors_like_lrs_vqa_but_keeps_one():
    assert keep_count(144, 0.25) == 36 and keep_count(100, 0.29) == 29 and keep_count(3, 0.25) == 1 and keep_count(0, 0.5) == 0
    # floor, not round: 1.75 keeps 1 and 2.9 keeps 2
    assert keep_count(7, 0.25) == 1 and keep_count(10, 0.29) == 2 and keep_count(15, 0.1) == 1


def test_pooling_averages_each_tile():
    features = torch.arange(2 * 4 * 4 * 1, dtype=torch.float32).reshape(2, 4, 4, 1)
    pooled = pool_tiles(features, 2)
    assert pooled.shape == (2, 2, 2, 1) and pooled[0, 0, 0, 0].item() == (0 + 1 + 4 + 5) / 4


# -- the loop with planted importance ------------------------------------------------------------


def _levels(side: int = 256, base: int = 64) -> list[Level]:
    return [Level.of(side, side, s, TILE, CELLS) for s in pyramid_sides(side, base)]


def _planted(levels: list[Level], importance) -> tuple[torch.Tensor, callable, callable, list]:
    """Features carrying `importance(level, row, col)` in channel 0; returns (base, fetch, score, fetch log)."""
    fetched = []

    def features(level_index: int, tiles: torch.Tensor) -> torch.Tensor:
        local = torch.arange(CELLS)
        rows = tiles[:, 0, None, None] * CELLS + local[None, :, None]
        cols = tiles[:, 1, None, None] * CELLS + local[None, None, :]
        rows, cols = rows.expand(-1, CELLS, CELLS), cols.expand(-1, CELLS, CELLS)
        return torch.stack([importance(level_index, rows, cols).float(), rows.float(), cols.float()], dim=-1)

    def fetch(level_index: int, tiles: torch.Tensor) -> torch.Tensor:
        fetched.append((level_index, tiles.tolist()))
        return features(level_index, tiles)

    base_level = levels[0]
    rows, cols = torch.meshgrid(torch.arange(base_level.rows), torch.arange(base_level.cols), indexing="ij")
    base = features(0, torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1))
    return base, fetch, (lambda level, f: f[:, 0]), fetched


def _hot_tile(tile_row: int, tile_col: int):
    """Importance 1 on every token of one tile of the given level, 0 elsewhere."""
    return lambda rows, cols: ((rows // CELLS == tile_row) & (cols // CELLS == tile_col)).float()


def test_planted_importance_chooses_the_planted_tiles_down_to_full_resolution():
    levels = _levels()  # sides 64 (2 x 2 tiles), 128 (4 x 4), 256 (8 x 8); 16 tokens per tile
    plants = {0: _hot_tile(1, 0), 1: _hot_tile(3, 1), 2: _hot_tile(7, 3)}
    base, fetch, score, fetched = _planted(levels, lambda level, r, c: plants[level](r, c))
    result = coarse_to_fine(levels, base, fetch, score, keep_ratio=0.25, budget=64)
    # base tile (1, 0) = scene [0, 128) x [128, 256) -> its four level-128 tiles; then tile (3, 1) -> four full-res tiles
    assert fetched == [(1, [[2, 0], [2, 1], [3, 0], [3, 1]]), (2, [[6, 2], [6, 3], [7, 2], [7, 3]])]
    assert result.level == 2
    # the final selection is the planted full-resolution tile's 16 tokens, in raster order
    assert sorted(set((result.tokens.row // CELLS).tolist())) == [7] and set((result.tokens.col // CELLS).tolist()) == {3}
    keys = (result.tokens.row * 100 + result.tokens.col).tolist()
    assert keys == sorted(keys) and len(keys) == 16
    assert bool((result.features[:, 0] == 1).all())


def test_the_budget_stops_the_zoom_and_caps_the_tokens():
    levels = _levels()
    plants = {0: _hot_tile(1, 0), 1: _hot_tile(3, 1), 2: _hot_tile(7, 3)}
    base, fetch, score, fetched = _planted(levels, lambda level, r, c: plants[level](r, c))
    # the first zoom would keep keep_count(4 tiles * 16) = 16 tokens: a budget of 15 is spent already
    result = coarse_to_fine(levels, base, fetch, score, keep_ratio=0.25, budget=15)
    assert fetched == [] and result.level == 0 and result.features.shape[0] == 15
    assert bool((result.features[:, 0] == 1).all())  # the best 15 of the 16 kept base tokens


@st.composite
def random_maps(draw):
    side = draw(st.sampled_from([96, 128, 200, 256]))
    base = draw(st.sampled_from([32, 48, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    keep_ratio = draw(st.sampled_from([0.1, 0.25, 0.5]))
    budgets = sorted(draw(st.lists(st.integers(1, 400), min_size=2, max_size=2)))
    return side, base, seed, keep_ratio, budgets


@settings(max_examples=40, deadline=None)
@given(random_maps())
def test_more_budget_never_chooses_fewer_tiles(case):
    side, base_side, seed, keep_ratio, budgets = case
    levels = _levels(side, base_side)
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.rand(level.rows * CELLS, level.cols * CELLS, generator=generator) for level in levels]
    results = []
    for budget in budgets:
        base, fetch, score, _ = _planted(levels, lambda level, r, c: maps[level][r, c])
        result = coarse_to_fine(levels, base, fetch, score, keep_ratio=keep_ratio, budget=budget)
        assert result.features.shape[0] <= budget
        # it stops at full resolution, or where zooming would keep more tokens than the budget
        if result.level < len(levels) - 1:
            level = levels[result.level]
            tokens = level.tokens(result.tiles[-1])
            scores = maps[result.level][tokens.row, tokens.col]
            kept = torch.sort(scores, descending=True, stable=True).indices[: keep_count(len(scores), keep_ratio)]
            candidates = tiles_covering(tokens.box[kept], levels[result.level + 1])
            assert keep_count(candidates.shape[0] * CELLS * CELLS, keep_ratio) > budget
        results.append(result)
    small, large = results
    assert large.level >= small.level
    for tiles_small, tiles_large in zip(small.tiles, large.tiles):
        assert set(map(tuple, tiles_small.tolist())) <= set(map(tuple, tiles_large.tolist()))


# -- the strategy on the tiny model ---------------------------------------------------------------


def _strategy(budget: int, **c2f) -> CoarseToFineStrategy:
    return CoarseToFineStrategy(PruningConfig(strategy="c2f", budget=budget, c2f={"base_side": 64, **c2f}))


def test_second_question_on_the_same_area_reuses_cached_tiles(tiny_model, image_factory):
    model, _ = tiny_model
    source = CountingSource(image_factory(200, 240))
    strategy = _strategy(budget=400)
    with torch.no_grad():
        encoding = strategy.encode(model, source)
        assert isinstance(encoding, C2FEncoding) and source.windows == []  # encode reads whole views only
        assert sorted(source.views) == strategy.views(model.config, 240, 200)
        first = strategy.select(model, encoding, "Where is the harbour?")
        reads = len(source.windows)
        assert reads == len(encoding.cache) > 0  # it zoomed, reading each fine window once
        again = strategy.select(model, encoding, "Where is the harbour?")
    assert len(source.windows) == reads
    torch.testing.assert_close(again.embeds, first.embeds)
    # only fine windows were read, never the whole scene at full resolution
    finest = encoding.levels[-1]
    assert reads < finest.rows * finest.cols


@pytest.mark.parametrize("layer", [0, 1])  # the tiny LM has 2 layers: 1 is the default (middle), 0 is not
def test_tokens_are_scored_at_the_configured_layer(tiny_model, image_factory, layer):
    model, _ = tiny_model
    question = "Where is the harbour?"
    source = ArraySource(image_factory(200, 240))
    strategy = _strategy(budget=400, importance_layer=layer)
    with torch.no_grad():
        encoding = strategy.encode(model, source)
        tokens = strategy.select(model, encoding, question)
        # The loop by hand, each level scored by the last prompt token's attention at a given layer
        # with the thumbnail in the context; tiles fetched into a fresh encoding's cache.
        context = encoding.global_tokens.embeds
        fresh = strategy.encode(model, source)

        def run(at: int):
            def score(level_index, features):
                embeds = torch.cat([context, features])
                return model.visual_importance(embeds, question, layer=at, query="last")[len(context) :]

            def fetch(level_index, tiles):
                return strategy._fetch(model, fresh, level_index, tiles)

            return coarse_to_fine(encoding.levels, encoding.base, fetch, score, strategy.config.c2f.keep_ratio, 400 - len(context))

        results = [run(0), run(1)]
    local = tokens.scale != 0
    expected = results[layer]
    assert torch.unique(tokens.scale[local]).tolist() == [expected.level + 1]
    assert tokens.row[local].tolist() == expected.tokens.row.tolist() and tokens.col[local].tolist() == expected.tokens.col.tolist()
    torch.testing.assert_close(tokens.embeds[local], expected.features)
    # the two layers keep different tokens, so the layer used is the configured one
    chosen = [set(zip(r.tokens.row.tolist(), r.tokens.col.tolist())) for r in results]
    assert chosen[0] != chosen[1]


def test_an_enlarged_base_level_is_read_as_one_view_of_its_size(tiny_model, image_factory):
    model, _ = tiny_model
    source = CountingSource(image_factory(40, 100))
    strategy = _strategy(budget=400, base_side=50)  # base 50 x 20, enlarged by 1.28 to fill two 32-px tiles across
    with torch.no_grad():
        encoding = strategy.encode(model, source)
        tokens = strategy.select(model, encoding, "Where is the harbour?")
    base = encoding.levels[0]
    assert (base.width, base.height, base.rows, base.cols) == (64, 26, 1, 2)
    assert sorted(source.views) == strategy.views(model.config, 100, 40) == [32, 64]
    finest = encoding.levels[-1]  # 128 x 51 in 8-px cells: 16 x 7 valid of 16 x 8
    every_tile = torch.tensor([[r, c] for r in range(finest.rows) for c in range(finest.cols)])
    assert finest.token_count == len(finest.tokens(every_tile).index) == 16 * 7
    assert encoding.dense == model.patch_grid**2 + 16 * 7  # thumbnail + the full-resolution level, padding left out
    assert len(tokens) <= 400 and bool((tokens.box[:, 2] <= 100 + 1e-3).all())


def test_output_is_global_context_then_the_final_level_in_raster_order(tiny_model, image_factory):
    model, _ = tiny_model
    grid = model.patch_grid
    strategy = _strategy(budget=400)
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image_factory(200, 240)))
        tokens = strategy.select(model, encoding, "Count the cars.")
    assert len(tokens) <= 400
    glob = tokens.scale == 0
    assert int(glob.sum()) == grid * grid and bool(glob[: grid * grid].all())
    local_scales = torch.unique(tokens.scale[~glob]).tolist()
    assert len(local_scales) == 1  # one final level, no coarse leftovers
    keys = (tokens.row[~glob] * 10_000 + tokens.col[~glob]).tolist()
    assert keys == sorted(keys)
    assert bool((tokens.n_source[~glob] == strategy.config.c2f.pool**2).all())


@pytest.mark.parametrize("budget", [1, 2, 5, 40, 86])
def test_small_budgets_pool_or_drop_the_thumbnail(tiny_model, image_factory, budget):
    model, _ = tiny_model
    strategy = _strategy(budget=budget)
    with torch.no_grad():
        tokens = strategy.select(model, strategy.encode(model, ArraySource(image_factory(90, 120))), "q")
    glob = int((tokens.scale == 0).sum())
    assert len(tokens) <= budget and glob <= int(budget * 0.75) and len(tokens) > glob
    assert (glob == model.patch_grid**2) == (budget >= 86)  # 64 tokens fit in 75% of 86, not of 40
    assert int(tokens.n_source[tokens.scale == 0].sum()) == (model.patch_grid**2 if glob else 0)


def test_the_tile_cache_is_bounded(tiny_model, image_factory):
    model, _ = tiny_model
    source = CountingSource(image_factory(200, 240))
    strategy = _strategy(budget=400, max_cached_tiles=2)
    with torch.no_grad():
        encoding = strategy.encode(model, source)
        first = strategy.select(model, encoding, "Where is the harbour?")
        reads = len(source.windows)
        assert reads > 2 and len(encoding.cache) == 2  # the most recently used tiles stay
        again = strategy.select(model, encoding, "Where is the harbour?")
    assert len(source.windows) > reads  # evicted tiles are read again, and give the same tokens
    torch.testing.assert_close(again.embeds, first.embeds)


def test_the_tile_cache_evicts_the_least_recently_used_tile(tiny_model, image_factory):
    model, _ = tiny_model
    source = CountingSource(image_factory(200, 240))
    strategy = _strategy(budget=400, max_cached_tiles=2)
    a, b, c = (1, 0, 0), (1, 0, 1), (1, 1, 0)  # (level, row, col) of three level-1 tiles
    with torch.no_grad():
        encoding = strategy.encode(model, source)
        first_a = strategy._fetch(model, encoding, 1, torch.tensor([a[1:], b[1:]]))[0]
        strategy._fetch(model, encoding, 1, torch.tensor([a[1:]]))  # a hit: a is now the most recent
        assert len(source.windows) == 2
        strategy._fetch(model, encoding, 1, torch.tensor([c[1:]]))
        # b, used least recently, is evicted, not a, the first one stored
        assert list(encoding.cache) == [a, c] and len(source.windows) == 3
        again_a = strategy._fetch(model, encoding, 1, torch.tensor([a[1:]]))[0]
    assert len(source.windows) == 3 and list(encoding.cache) == [c, a]
    torch.testing.assert_close(again_a, first_a)


def test_tiles_are_projected_then_pooled_as_lrs_vqa_does(tiny_model, image_factory):
    model, _ = tiny_model
    strategy = _strategy(budget=400)
    source = ArraySource(image_factory(200, 240))
    with torch.no_grad():
        encoding = strategy.encode(model, source)
        level = encoding.levels[0]
        view = source.read_view(max(level.width, level.height))
        grid = model.encode_view(view, scale=1, box=encoding.grids[0].box)
        rows, cols, g = grid.features.shape[0], grid.features.shape[1], model.patch_grid
        projected = model.project(grid.features.reshape(rows * cols, g, g, -1))  # (n, g, g, D)
        expected = F.avg_pool2d(projected.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(encoding.base, expected)
    assert encoding.base.shape[-1] == model.config.text_config.hidden_size


def test_the_thumbnail_keeps_the_aspect_ratio_on_a_zero_canvas(tiny_model, image_factory):
    model, _ = tiny_model
    image = image_factory(60, 240)  # 4:1 landscape: the top quarter of the thumbnail tile is the scene
    strategy = _strategy(budget=400)
    with torch.no_grad():
        tokens = strategy.select(model, strategy.encode(model, ArraySource(image)), "Where is the harbour?")
        view = ArraySource(image).read_view(32)
        canvas = np.zeros((32, 32, 3), dtype=np.uint8)
        canvas[: view.shape[0], : view.shape[1]] = view
        features, _ = model.encode_tiles(torch.from_numpy(canvas)[None])
        expected = model.project(features[0].reshape(64, -1))
    thumbnail = tokens.scale == 0
    torch.testing.assert_close(tokens.embeds[thumbnail], expected)
    # Its 8 x 8 tokens span 240 x 240 scene pixels from the top-left corner: rows past 60 px are padding.
    boxes = tokens.box[thumbnail]
    assert float(boxes[:, 2].max()) == 240.0 and float(boxes[:, 3].max()) == 240.0
