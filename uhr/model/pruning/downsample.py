"""The naive baseline: the whole scene as one low-resolution view, every token of it.

The view is the largest one whose tile grid fits the budget: its longest side is k whole tiles
(or the scene's own longest side, never more: upsampling adds no information), for the largest k
with rows * cols * g*g <= budget, where (rows, cols) is the bottom/right-padded tile grid of the
aspect-kept view. Tokens that see only padding are dropped; the others are projected and emitted in
raster order at scale 0. When even one tile holds more than the budget (g*g > budget), its valid
token grid is average-pooled into the largest grid of at most `budget` cells that keeps the
aspect; the pooling windows partition the grid (sizes differ by at most one cell), so every
token's feature is in exactly one output token. `dense` counts the view's valid tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from uhr.model import tiling
from uhr.model.pruning.base import PrunedTokens, PruningStrategy, SceneEncoding, TokenGrid
from uhr.model.pruning.grouping import group_mean, group_provenance
from uhr.scenes.source import PixelSource, fit_longest_side

if TYPE_CHECKING:
    from uhr.model.config import UhrConfig
    from uhr.model.modeling import UhrForConditionalGeneration


def downsample_side(width: int, height: int, tile: int, patch_grid: int, budget: int) -> int:
    """Longest side of the largest view whose padded tile grid holds at most `budget` tokens.

    Candidates are k * tile for k = 1, 2, ... capped at the scene's longest side; when not even one
    tile fits, the smallest candidate is returned (its tokens are then pooled).
    """
    longest = max(width, height)
    best = min(tile, longest)
    for k in range(1, math.ceil(longest / tile) + 1):
        side = min(k * tile, longest)
        view_w, view_h = fit_longest_side(width, height, side)
        rows, cols = tiling.tile_grid(view_h, view_w, tile)
        if rows * cols * patch_grid * patch_grid > budget:
            break
        best = side
    return best


def pooled_shape(height: int, width: int, budget: int) -> tuple[int, int]:
    """Largest (h, w) with h * w <= budget, h <= height, w <= width, close to the height:width aspect."""
    if height * width <= budget:
        return height, width
    h = min(height, budget, max(1, math.floor(math.sqrt(budget * height / width))))
    w = min(width, max(1, budget // h))
    return h, w


def pooling_groups(height: int, width: int, out_h: int, out_w: int, device: torch.device | None = None) -> torch.Tensor:
    """(height, width) long window id in [0, out_h * out_w): cell (r, c) -> (r * out_h // height, c * out_w // width)."""
    rows = torch.arange(height, device=device) * out_h // height
    cols = torch.arange(width, device=device) * out_w // width
    return rows[:, None] * out_w + cols[None, :]


def pool_to_budget(model: UhrForConditionalGeneration, grid: TokenGrid, budget: int) -> PrunedTokens:
    """Every valid token of `grid`, average-pooled into at most `budget` windows, projected."""
    valid = grid.valid
    rows, cols = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
    features = grid.stitched()[:rows, :cols]  # padding is bottom/right only
    out_h, out_w = pooled_shape(rows, cols, budget)
    count = out_h * out_w
    groups = torch.full(grid.shape, -1, dtype=torch.long, device=valid.device)
    groups[:rows, :cols] = pooling_groups(rows, cols, out_h, out_w, valid.device)
    pooled = group_mean(features.reshape(rows * cols, -1), groups[:rows, :cols].reshape(-1), count)
    provenance = group_provenance(groups, count, grid.token_boxes().to(valid.device), grid.patch_grid, grid.tiles[1])
    return PrunedTokens(
        embeds=model.project(pooled),
        scale=torch.zeros(count, dtype=torch.long, device=valid.device),
        row=provenance.row,
        col=provenance.col,
        tile=provenance.tile,
        n_source=provenance.n_source,
        box=provenance.box,
        dense=rows * cols,
    )


@dataclass(kw_only=True)
class DownsampleEncoding(SceneEncoding):
    """A downsampled scene; query-independent, so it holds the final tokens."""

    tokens: PrunedTokens


class DownsampleStrategy(PruningStrategy):
    """One low-resolution view, all its tokens (pooled only when one tile exceeds the budget)."""

    name = "downsample"
    query_guided = False

    def views(self, config: UhrConfig, width: int, height: int) -> list[int]:
        """The single view `encode` reads."""
        return [downsample_side(width, height, config.tile_size, config.patch_grid, self.config.budget)]

    def encode(self, model: UhrForConditionalGeneration, source: PixelSource) -> DownsampleEncoding:
        tile = model.tile_size
        width, height = source.width, source.height
        (side,) = self.views(model.config, width, height)
        view = source.read_view(side)
        box = tiling.padded_box(width, height, view.shape[1], view.shape[0], tile)
        grid = model.encode_view(view, scale=0, box=box)
        tokens = pool_to_budget(model, grid, self.config.budget)
        return DownsampleEncoding(grids=[grid], dense=tokens.dense, width=width, height=height, tokens=tokens)

    def select(self, model: UhrForConditionalGeneration, encoding: SceneEncoding, question: str) -> PrunedTokens:
        if not isinstance(encoding, DownsampleEncoding):
            raise TypeError(f"downsample.select needs the DownsampleEncoding its encode made, got {type(encoding).__name__}")
        return encoding.tokens
