"""LRS-VQA coarse-to-fine text-guided token pruning on a dynamic image pyramid.

Pyramid (LRS-VQA's DIP): with L the scene's longest side, levels at ratios 1, 1/2, 1/4, ... of L
down to the base L_0 = min(base_side, L) (appended if the halving does not hit it exactly), ordered
coarse to fine. A level is the aspect-kept scene at that longest side, enlarged as LRS-VQA enlarges
it: by the largest factor that keeps it inside the same grid of whole tiles, so one side fills its
tiles (the finest level is then slightly upsampled: 8192 px to 8400 for 336-px tiles), then
zero-padded bottom/right to whole tiles and cut into raster tiles; every tile's g x g patch grid
goes through the projector and is then average-pooled by `pool` in the LM's space, in LRS-VQA's
order (24 x 24 -> 12 x 12, which for pool 2 equals its 2x bilinear downscale). Optionally a global thumbnail gives the context
LRS-VQA prepends: the scene at one tile's longest side, aspect kept, top-left on a zero canvas of
one tile, as LRS-VQA builds it (g x g unpooled tokens).

`encode` (query-independent) reads and encodes the thumbnail and the whole base level. Per
question (`coarse_to_fine`):

1. score the current level's valid tokens with the LM's attention from the last prompt token
   (LRS-VQA's Region Focus target; the LM's own layer stands in for the distilled RFM, and the
   head-averaged softmax runs over the whole prompt rather than over the local image keys only),
   the thumbnail tokens in the context. The base level's tokens are the same for every question:
   the LM runs over them once per scene (`importance_prefix`), then over each question's own text;
2. keep the top `keep_ratio` of them (floor, at least one);
3. if this is the full-resolution level, stop;
4. otherwise the candidates are the next level's tiles that overlap a kept token's footprint (the
   released code maps each token's grid corner proportionally, which misses the second tile of a
   token straddling a tile border). The budget then decides between zooming in and pruning at the
   current level, the choice LRS-VQA makes at every level: the candidates are read only if the
   tokens the next level would keep from them, keep_count(tiles * (g / pool)^2), fit the local
   budget B_local = B - thumbnail tokens; otherwise the budget is spent and the current level's
   selection is final. Only the candidate windows are read from the source (`read_windows`),
   encoded and cached in the encoding, so later questions on the same area reuse them.

Output: the global thumbnail tokens, then the final level's kept tokens (at most B_local of them,
the highest scored) in raster order of that level's pooled token grid. As in LRS-VQA, coarser
levels serve only to choose where to look: their tokens are not emitted, so areas not refined are
represented by the global thumbnail alone. No newline tokens: LRS-VQA keeps LLaVA-NeXT's one per
row of the final level's grid, which would spend the hard budget on rows that may hold no kept
token. The thumbnail takes at most `global_max_fraction` of the budget (and always leaves one
token for the local selection): beyond that its grid is average-pooled to fit; with no room at all
(B = 1) it is left out.

Provenance: scale 0 is the thumbnail, scale l + 1 pyramid level l; rows/cols index the pooled
grid of that scale; n_source counts the tower tokens averaged into each token. `dense` counts the
thumbnail's g*g tokens plus the full-resolution level's valid pooled tokens (the whole scene unpruned,
its padding left out as LRS-VQA trims it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from uhr.model import tiling
from uhr.model.pruning.base import PrunedTokens, PruningStrategy, SceneEncoding
from uhr.model.pruning.downsample import pooled_shape, pooling_groups
from uhr.model.pruning.grouping import cell_boxes, group_mean, group_provenance
from uhr.model.pruning.uhr_bat import middle_layer
from uhr.scenes.source import PixelSource, fit_longest_side, read_windows

if TYPE_CHECKING:
    from uhr.model.config import UhrConfig
    from uhr.model.modeling import ImportancePrefix, UhrForConditionalGeneration


# ----------------------------------------------------------------------------------------------
# Pyramid geometry
# ----------------------------------------------------------------------------------------------


def pyramid_sides(longest: int, base_side: int) -> list[int]:
    """Longest sides of the pyramid levels, coarse to fine: round(L / 2^k) above the base, then the base."""
    if longest < 1 or base_side < 1:
        raise ValueError(f"pyramid needs positive sides, got longest={longest} base_side={base_side}")
    base = min(base_side, longest)
    sides = []
    k = 0
    while (side := round(longest / 2**k)) > base:
        sides.append(side)
        k += 1
    sides.append(base)
    return sides[::-1]


@dataclass
class LevelTokens:
    """Valid pooled tokens of some tiles of a level, in raster order of the level's pooled grid."""

    index: torch.Tensor
    """(K,) long position of each token in the tiles' flattened (n * cells * cells) features."""
    row: torch.Tensor
    col: torch.Tensor
    box: torch.Tensor
    """(K, 4) float scene-pixel box."""


@dataclass(frozen=True)
class Level:
    """One pyramid level: the scene at `width` x `height` level pixels, cut into `tile`-px tiles."""

    width: int
    height: int
    tile: int
    cells: int
    """Pooled tokens per tile side (g // pool)."""
    scene_width: int
    scene_height: int

    @staticmethod
    def of(scene_width: int, scene_height: int, side: int, tile: int, cells: int) -> Level:
        """The level whose unenlarged longest side is `side`, enlarged to fill its tiles as LRS-VQA does.

        LRS-VQA scales the aspect-kept (w, h) by min(ceil(w / tile) * tile / w, ceil(h / tile) * tile / h).
        The level is kept an aspect-kept resize of its longest side, as `read_view` serves it, so
        the short side may come out a pixel shorter than LRS-VQA's (7099 x 6329 at 1775: 1884 x 1680
        here, 1885 x 1680 there); the tile grid is the same.
        """
        width, height = fit_longest_side(scene_width, scene_height, side)
        cols, rows = -(-width // tile), -(-height // tile)
        longest = round(max(width, height) * min(cols * tile / width, rows * tile / height))
        while True:  # rounding may push a side one pixel past its tiles; `side` itself always fits
            width, height = fit_longest_side(scene_width, scene_height, longest)
            if width <= cols * tile and height <= rows * tile:
                return Level(width, height, tile, cells, scene_width, scene_height)
            longest -= 1

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    @property
    def token_count(self) -> int:
        """Valid pooled tokens of the whole level: the cells that see some of the scene, padding excluded."""
        cell = self.tile / self.cells
        return math.ceil(self.width / cell) * math.ceil(self.height / cell)

    @property
    def tile_scene_size(self) -> tuple[float, float]:
        """(width, height) in scene pixels of one tile."""
        return self.tile * self.scene_width / self.width, self.tile * self.scene_height / self.height

    def window(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(col_off, row_off, width, height) scene-pixel window of tile (row, col), rounded to pixels."""
        tile_w, tile_h = self.tile_scene_size
        x0, x1 = round(col * tile_w), round((col + 1) * tile_w)
        y0, y1 = round(row * tile_h), round((row + 1) * tile_h)
        return x0, y0, x1 - x0, y1 - y0

    def tokens(self, tiles: torch.Tensor) -> LevelTokens:
        """The pooled tokens of `tiles` ((n, 2) long (row, col)): positions, boxes, validity, raster order."""
        cells = self.cells
        device = tiles.device
        n = tiles.shape[0]
        local = torch.arange(cells, device=device)
        # (n, cells, cells) grid coordinates of every pooled token, tile-major like the features
        rows = (tiles[:, 0, None, None] * cells + local[None, :, None]).expand(n, cells, cells).reshape(-1)
        cols = (tiles[:, 1, None, None] * cells + local[None, None, :]).expand(n, cells, cells).reshape(-1)
        cell_px = self.tile / cells
        valid = (cols * cell_px < self.width) & (rows * cell_px < self.height)
        scale_x, scale_y = self.scene_width / self.width, self.scene_height / self.height
        boxes = torch.stack(
            [cols * cell_px * scale_x, rows * cell_px * scale_y, (cols + 1) * cell_px * scale_x, (rows + 1) * cell_px * scale_y],
            dim=1,
        ).float()
        order = torch.argsort(rows * (self.cols * cells) + cols)
        order = order[valid[order]]
        return LevelTokens(index=order, row=rows[order], col=cols[order], box=boxes[order])


def keep_count(tokens: int, keep_ratio: float) -> int:
    """Tokens kept of `tokens`: floor(tokens * keep_ratio) as LRS-VQA, at least one of a non-empty set."""
    if tokens <= 0:
        return 0
    return max(1, math.floor(tokens * keep_ratio + 1e-9))


def tiles_covering(boxes: torch.Tensor, level: Level) -> torch.Tensor:
    """(m, 2) long (row, col) of the tiles of `level` that overlap any box, in raster order.

    A box overlaps a tile when their intersection has positive area.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=boxes.device)
    tile_w, tile_h = level.tile_scene_size
    box = boxes.double()
    eps = 1e-9
    c0 = torch.floor(box[:, 0] / tile_w + eps).long().clamp(0, level.cols - 1)
    c1 = (torch.ceil(box[:, 2] / tile_w - eps).long() - 1).clamp(0, level.cols - 1)
    r0 = torch.floor(box[:, 1] / tile_h + eps).long().clamp(0, level.rows - 1)
    r1 = (torch.ceil(box[:, 3] / tile_h - eps).long() - 1).clamp(0, level.rows - 1)
    span_r, span_c = int((r1 - r0).max()) + 1, int((c1 - c0).max()) + 1
    hits = []
    for dr in range(span_r):
        for dc in range(span_c):
            inside = (r0 + dr <= r1) & (c0 + dc <= c1)
            hits.append(((r0 + dr) * level.cols + (c0 + dc))[inside])
    flat = torch.unique(torch.cat(hits))  # sorted: raster order
    return torch.stack([flat // level.cols, flat % level.cols], dim=1)


# ----------------------------------------------------------------------------------------------
# The coarse-to-fine loop, on tensors
# ----------------------------------------------------------------------------------------------


@dataclass
class CoarseToFineResult:
    """Where the zoom stopped and what it keeps there."""

    level: int
    """Index of the final level (0 = base)."""
    features: torch.Tensor
    """(M, D) kept pooled tokens, raster order."""
    tokens: LevelTokens
    """Positions of the kept tokens on the final level."""
    tiles: list[torch.Tensor] = field(default_factory=list)
    """Tiles encoded at each visited level ((n, 2) long), base first."""


def coarse_to_fine(
    levels: list[Level],
    base: torch.Tensor,
    fetch: Callable[[int, torch.Tensor], torch.Tensor],
    score: Callable[[int, torch.Tensor], torch.Tensor],
    keep_ratio: float,
    budget: int,
) -> CoarseToFineResult:
    """Zoom from the base level towards full resolution while the budget allows.

    Args:
        levels: pyramid levels, coarse to fine.
        base: (rows * cols, cells, cells, D) pooled features of every base tile, raster order.
        fetch: (level index, (n, 2) tiles) -> (n, cells, cells, D) pooled features of those tiles.
        score: (level index, (K, D) features of that level's valid tokens in raster order) -> (K,) importance.
        keep_ratio: fraction of a level's tokens kept.
        budget: local token budget (>= 1).

    Returns:
        The final level's kept tokens: the top min(keep_count, budget) by score, in raster order.
    """
    if budget < 1:
        raise ValueError(f"coarse_to_fine needs a budget of at least one token, got {budget}")
    level_index = 0
    level = levels[0]
    rows, cols = torch.meshgrid(torch.arange(level.rows), torch.arange(level.cols), indexing="ij")
    tiles = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).to(base.device)
    features = base
    visited = [tiles]
    per_tile = level.cells * level.cells
    while True:
        tokens = level.tokens(tiles)
        flat = features.reshape(-1, features.shape[-1])[tokens.index]
        scores = score(level_index, flat)
        ranked = torch.sort(scores, descending=True, stable=True).indices
        kept = ranked[: keep_count(flat.shape[0], keep_ratio)]
        if level_index + 1 < len(levels):
            candidates = tiles_covering(tokens.box[kept], levels[level_index + 1])
            if keep_count(candidates.shape[0] * per_tile, keep_ratio) <= budget:
                level_index += 1
                level = levels[level_index]
                tiles = candidates
                features = fetch(level_index, tiles)
                visited.append(tiles)
                continue
        final = kept[:budget].sort().values  # raster order
        chosen = LevelTokens(
            index=tokens.index[final], row=tokens.row[final], col=tokens.col[final], box=tokens.box[final]
        )
        return CoarseToFineResult(level=level_index, features=flat[final], tokens=chosen, tiles=visited)


def pool_tiles(features: torch.Tensor, pool: int) -> torch.Tensor:
    """(n, g, g, D) -> (n, g // pool, g // pool, D) average pooling of each tile's patch grid."""
    if pool == 1:
        return features
    # (n, g, g, D) -> (n, D, g, g) -> pooled -> (n, g', g', D)
    return F.avg_pool2d(features.permute(0, 3, 1, 2), kernel_size=pool).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# The strategy
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class C2FEncoding(SceneEncoding):
    """The scene's pyramid, its encoded base level and thumbnail, the source and a fine-tile cache."""

    source: PixelSource
    levels: list[Level]
    base: torch.Tensor
    """(rows * cols, cells, cells, D) pooled base-level tokens, projected into the LM's space."""
    global_tokens: PrunedTokens | None
    """The thumbnail's tokens, None without a global view."""
    cache: OrderedDict[tuple[int, int, int], torch.Tensor] = field(default_factory=OrderedDict)
    """(level, row, col) -> (cells, cells, D) pooled projected tokens of fine tiles encoded so far, least recently used first."""
    base_prefix: ImportancePrefix | None = None
    """The thumbnail and base-level tokens run through the LM for scoring, made by the first question."""


class CoarseToFineStrategy(PruningStrategy):
    """LRS-VQA coarse-to-fine text-guided pruning: read and encode only the windows the question needs."""

    name = "c2f"
    query_guided = True

    def views(self, config: UhrConfig, width: int, height: int) -> list[int]:
        """The thumbnail (one tile) and the base level; finer levels are read as windows."""
        side = pyramid_sides(max(width, height), self.config.c2f.base_side)[0]
        base = Level.of(width, height, side, config.tile_size, config.patch_grid // self.config.c2f.pool)
        sides = {max(base.width, base.height)}
        if self._thumbnail_room() > 0:
            sides.add(config.tile_size)
        return sorted(sides)

    def _thumbnail_room(self) -> int:
        """Tokens the thumbnail may take: `global_max_fraction` of B, leaving one; 0 without it."""
        if not self.config.c2f.global_view:
            return 0
        budget = self.config.budget
        return min(math.floor(budget * self.config.c2f.global_max_fraction), budget - 1)

    def _cells(self, model: UhrForConditionalGeneration) -> int:
        pool, grid = self.config.c2f.pool, model.patch_grid
        if grid % pool:
            raise ValueError(f"c2f pool {pool} does not divide the tower's {grid} x {grid} patch grid")
        return grid // pool

    def encode(self, model: UhrForConditionalGeneration, source: PixelSource) -> C2FEncoding:
        cfg = self.config.c2f
        tile, grid = model.tile_size, model.patch_grid
        cells = self._cells(model)
        width, height = source.width, source.height
        levels = [Level.of(width, height, side, tile, cells) for side in pyramid_sides(max(width, height), cfg.base_side)]

        pixels = source.read_view(max(levels[0].width, levels[0].height))
        box = tiling.padded_box(width, height, pixels.shape[1], pixels.shape[0], tile)
        base_grid = model.encode_view(pixels, scale=1, box=box)
        rows, cols = base_grid.tiles
        if (rows, cols) != (levels[0].rows, levels[0].cols):
            raise ValueError(
                f"source returned a {pixels.shape[1]}x{pixels.shape[0]} base view, expected "
                f"{levels[0].width}x{levels[0].height} (longest side {max(levels[0].width, levels[0].height)})"
            )
        base = pool_tiles(model.project(base_grid.features.reshape(rows * cols, grid, grid, -1)), cfg.pool)

        global_tokens = self._global_tokens(model, source)
        dense = (0 if global_tokens is None else grid * grid) + levels[-1].token_count
        return C2FEncoding(
            grids=[base_grid],
            dense=dense,
            width=width,
            height=height,
            source=source,
            levels=levels,
            base=base,
            global_tokens=global_tokens,
        )

    def _global_tokens(self, model: UhrForConditionalGeneration, source: PixelSource) -> PrunedTokens | None:
        """The thumbnail's tokens (scale 0), pooled to fit its room in the budget; None without room."""
        tile, grid = model.tile_size, model.patch_grid
        room = self._thumbnail_room()
        if room < 1:
            return None
        view = source.read_view(tile)  # aspect kept, longest side one tile
        thumbnail = np.zeros((tile, tile, 3), dtype=np.uint8)
        thumbnail[: view.shape[0], : view.shape[1]] = view
        features, _ = model.encode_tiles(torch.from_numpy(thumbnail)[None])
        features = features[0].reshape(grid * grid, -1)
        out_h, out_w = pooled_shape(grid, grid, room)
        groups = pooling_groups(grid, grid, out_h, out_w, features.device)
        count = out_h * out_w
        side = float(max(source.width, source.height))  # the canvas spans the longest side both ways
        boxes = cell_boxes((0.0, 0.0, side, side), grid, grid).to(features.device)
        provenance = group_provenance(groups, count, boxes, grid, 1)
        return PrunedTokens(
            embeds=group_mean(model.project(features), groups.reshape(-1), count),
            scale=torch.zeros(count, dtype=torch.long, device=features.device),
            row=provenance.row,
            col=provenance.col,
            tile=provenance.tile,
            n_source=provenance.n_source,
            box=provenance.box,
            dense=0,
        )

    def _fetch(
        self, model: UhrForConditionalGeneration, encoding: C2FEncoding, level_index: int, tiles: torch.Tensor
    ) -> torch.Tensor:
        """Pooled features of `tiles` at a fine level: cached ones reused, the others read and encoded.

        The cache keeps the `max_cached_tiles` most recently used tiles.
        """
        level = encoding.levels[level_index]
        cache = encoding.cache
        keys = [(level_index, int(r), int(c)) for r, c in tiles.tolist()]
        missing = [key for key in keys if key not in cache]
        if missing:
            size = (level.tile, level.tile)
            windows = read_windows(encoding.source, [level.window(r, c) for _, r, c in missing], out_size=size)
            features, _ = model.encode_tiles(torch.from_numpy(np.stack(windows)))
            cache.update(zip(missing, pool_tiles(model.project(features), self.config.c2f.pool)))
        for key in keys:
            cache.move_to_end(key)
        fetched = torch.stack([cache[key] for key in keys])
        while len(cache) > self.config.c2f.max_cached_tiles:
            cache.popitem(last=False)
        return fetched

    def select(self, model: UhrForConditionalGeneration, encoding: SceneEncoding, question: str) -> PrunedTokens:
        if not isinstance(encoding, C2FEncoding):
            raise TypeError(f"c2f.select needs the C2FEncoding its encode made, got {type(encoding).__name__}")
        cfg = self.config.c2f
        context = encoding.global_tokens
        context_count = 0 if context is None else len(context)
        layer = middle_layer(model, cfg.importance_layer)

        def embeds(tokens: torch.Tensor) -> torch.Tensor:
            return tokens if context is None else torch.cat([context.embeds, tokens])

        def score(level_index: int, features: torch.Tensor) -> torch.Tensor:
            if level_index == 0:
                if encoding.base_prefix is None:  # the scene's first question
                    encoding.base_prefix = model.importance_prefix(embeds(features), layer=layer)
                return model.prefixed_importance(encoding.base_prefix, question, query="last")[context_count:]
            return model.visual_importance(embeds(features), question, layer=layer, query="last")[context_count:]

        result = coarse_to_fine(
            encoding.levels,
            encoding.base,
            lambda level_index, tiles: self._fetch(model, encoding, level_index, tiles),
            score,
            cfg.keep_ratio,
            self.config.budget - context_count,
        )
        level = encoding.levels[result.level]
        count = result.features.shape[0]
        device = result.features.device
        tokens = result.tokens
        local = PrunedTokens(
            embeds=result.features,
            scale=torch.full((count,), result.level + 1, dtype=torch.long, device=device),
            row=tokens.row.to(device),
            col=tokens.col.to(device),
            tile=((tokens.row // level.cells) * level.cols + tokens.col // level.cells).to(device),
            n_source=torch.full((count,), cfg.pool * cfg.pool, dtype=torch.long, device=device),
            box=tokens.box.to(device),
            dense=encoding.dense,
        )
        return PrunedTokens.concat([local] if context is None else [context, local], dense=encoding.dense)


__all__ = [
    "C2FEncoding",
    "CoarseToFineResult",
    "CoarseToFineStrategy",
    "Level",
    "LevelTokens",
    "coarse_to_fine",
    "keep_count",
    "pool_tiles",
    "pyramid_sides",
    "tiles_covering",
]
