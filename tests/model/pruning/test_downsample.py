"""The downsample baseline: view choice, pooling windows, tokens of the tiny model."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uhr.model import tiling
from uhr.model.pruning.config import PruningConfig
from uhr.model.pruning.downsample import DownsampleStrategy, downsample_side, pooled_shape, pooling_groups
from uhr.scenes.source import ArraySource


def test_view_is_the_largest_whole_tile_side_that_fits():
    # 1000 x 500, 32-px tiles of 8 x 8 tokens: k = 3 gives 96 x 48 -> 2 x 3 tiles = 384 tokens; k = 4 needs 512
    assert downsample_side(1000, 500, tile=32, patch_grid=8, budget=384) == 96
    assert downsample_side(1000, 500, tile=32, patch_grid=8, budget=511) == 96
    assert downsample_side(1000, 500, tile=32, patch_grid=8, budget=512) == 128
    # never beyond the scene: no upsampling
    assert downsample_side(50, 40, tile=32, patch_grid=8, budget=10_000) == 50
    # not even one tile fits: one tile, pooled later
    assert downsample_side(1000, 500, tile=32, patch_grid=8, budget=10) == 32


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 2000))
def test_pooling_windows_partition_the_grid(height, width, budget):
    out_h, out_w = pooled_shape(height, width, budget)
    assert 1 <= out_h <= height and 1 <= out_w <= width and out_h * out_w <= budget
    groups = pooling_groups(height, width, out_h, out_w)
    sizes = torch.bincount(groups.reshape(-1), minlength=out_h * out_w)
    assert int(sizes.min()) >= 1 and int(sizes.sum()) == height * width
    # windows are rectangles whose sides differ by at most one cell
    row_sizes = torch.bincount(groups[:, 0] // out_w)
    col_sizes = torch.bincount(groups[0, :] % out_w)
    assert int(row_sizes.max() - row_sizes.min()) <= 1 and int(col_sizes.max() - col_sizes.min()) <= 1


def test_all_valid_tokens_projected_in_raster_order(tiny_model, image_factory):
    model, _ = tiny_model
    image = image_factory(50, 70)
    strategy = DownsampleStrategy(PruningConfig(strategy="downsample", budget=10_000))
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image))
        tokens = strategy.select(model, encoding, "ignored")
        grid = encoding.grids[0]
        view = ArraySource(image).read_view(70)
        rows, cols = -(-view.shape[0] // 4), -(-view.shape[1] // 4)  # 4-px patches; padding dropped
        expected = model.project(grid.stitched()[:rows, :cols].reshape(rows * cols, -1))
    assert strategy.views(model.config, 70, 50) == [70]
    assert len(tokens) == rows * cols == tokens.dense
    torch.testing.assert_close(tokens.embeds, expected)
    assert tokens.row.tolist() == torch.arange(rows).repeat_interleave(cols).tolist()
    assert bool((tokens.n_source == 1).all()) and bool((tokens.scale == 0).all())
    # a token's box is its patch's footprint in scene pixels (the view is 70/70 of the scene)
    assert tokens.box[cols + 1].tolist() == [4.0, 4.0, 8.0, 8.0]
    assert tokens.tile[cols * 8].item() == grid.tiles[1]  # first token of the second tile row


def test_one_tile_over_budget_is_pooled(tiny_model, image_factory):
    model, _ = tiny_model
    image = image_factory(90, 120)
    strategy = DownsampleStrategy(PruningConfig(strategy="downsample", budget=10))
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image))
        tokens = strategy.select(model, encoding, "ignored")
        grid = encoding.grids[0]
        rows, cols = int(grid.valid.any(1).sum()), int(grid.valid.any(0).sum())
        out_h, out_w = pooled_shape(rows, cols, 10)
        groups = pooling_groups(rows, cols, out_h, out_w)
        features = grid.stitched()[:rows, :cols]
        first = features[groups == 0].mean(0)
    assert grid.tiles == (1, 1) and rows * cols > 10
    assert len(tokens) == out_h * out_w <= 10
    assert int(tokens.n_source.sum()) == rows * cols == tokens.dense
    torch.testing.assert_close(tokens.embeds[0], model.project(first))
    assert tokens.box[0, :2].tolist() == [0.0, 0.0]
    assert tiling.tile_grid(*ArraySource(image).read_view(32).shape[:2], 32) == (1, 1)
