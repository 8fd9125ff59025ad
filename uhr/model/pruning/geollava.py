"""GeoLLaVA-8K: background token pruning + anchored token selection, per anyres tile.

Per 336-px tile (g x g patch grid of the tower's selected layer, plus its CLS token):

1. *Affinity*: the affinity head gives each token probabilities Q[i, k] over its 9 neighbour offsets
   (row-major (dy, dx), dy, dx in {-1, 0, 1}). A[i, clamp(i + offset_k)] += Q[i, k], with neighbours
   clamped at the tile border, so a border token's outward weight piles onto itself or its edge
   neighbours. parent(i) = argmax_j A[i, j] (ties to the smallest j).
2. *Pointer jumping*: root <- root[root] until unchanged or `pointer_rounds` rounds. A mutual pair
   i <-> j becomes two roots (each jumps onto itself).
3. *Clusters*: tokens sharing a root form a cluster; its centre is the mean of its members'
   features, held in the slot of the root's index (N = g*g slots, empty slots zero).
4. *Anchored selection*: score(c) = (W_q cls + b_q) . (W_v c + b_v) / sqrt(D_v) with the q_proj and
   v_proj of the tower's selected layer; empty slots score -inf; the top `max_tokens_per_tile` slots
   are kept and re-sorted by slot index (spatial order).

When a tile has fewer clusters than `max_tokens_per_tile`, the released model's top-k also picks
empty slots, whose zero features go through the projector: it was trained seeing those filler
tokens. They are emitted by default (`fill_empty_slots`), placed as a stable top-k places them (the
lowest-index empty slots), with `n_source = 0`; set it False to drop them.

The anyres grid is chosen as LLaVA-NeXT does among GeoLLaVA's pinpoints (multiples of the tile on
both sides, 2..max_tiles tiles, aspect at most max_aspect, at most max_tiles_per_side per side: the
released list exactly with the defaults) restricted to grids whose tiles * max_tokens_per_tile fit
the budget. The global thumbnail of the released preprocessor is
never encoded: the pruning branch drops it. With no such grid, the scene goes into one tile, which
(as released) keeps all g*g tokens unpruned when they fit the budget and is pruned to
min(max_tokens_per_tile, budget) clusters otherwise. Projection happens after selection, tiles are
concatenated in raster order, no newline tokens. Nothing depends on the question: `encode` does
everything and `select` returns it. In training, gradients reach the projector and the tower
through the cluster means; the affinity head gets none (parents are an argmax), as in the released
recipe. `dense` counts the chosen grid's tiles * g*g tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from uhr.model import tiling
from uhr.model.pruning.base import PrunedTokens, PruningStrategy, SceneEncoding
from uhr.model.pruning.grouping import cell_boxes, group_provenance
from uhr.scenes.source import PixelSource

if TYPE_CHECKING:
    from uhr.model.config import UhrConfig
    from uhr.model.modeling import UhrForConditionalGeneration

NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
"""The affinity head's 9 outputs, row-major (dy, dx)."""


# ----------------------------------------------------------------------------------------------
# The algorithm, on tensors
# ----------------------------------------------------------------------------------------------


def neighbour_targets(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(H*W, 9) long: raster index of each token's clamped neighbour for each offset."""
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    targets = [
        (ys + dy).clamp(0, height - 1) * width + (xs + dx).clamp(0, width - 1) for dy, dx in NEIGHBOUR_OFFSETS
    ]
    return torch.stack(targets, dim=1)


def affinity_parents(probs: torch.Tensor) -> torch.Tensor:
    """Parent of every token: argmax_j A[i, j] with A[i, clamp(i + offset_k)] += Q[i, k].

    Args:
        probs: (T, H, W, 9) neighbour probabilities Q of T tiles.

    Returns:
        (T, H*W) long parent indices; ties go to the smallest j, as a dense row argmax would.
    """
    tiles, height, width, offsets = probs.shape
    if offsets != len(NEIGHBOUR_OFFSETS):
        raise ValueError(f"affinity probabilities need {len(NEIGHBOUR_OFFSETS)} offsets, got {offsets}")
    count = height * width
    targets = neighbour_targets(height, width, probs.device)  # (N, 9)
    # In float32 as the released dense A is (torch.zeros), whatever the tower's dtype: bf16 sums of
    # a border token's 2-4 offsets round into false ties and flipped parents.
    q = probs.reshape(tiles, count, offsets).to(torch.promote_types(probs.dtype, torch.float32))
    # weight[t, i, k] = A[t, i, targets[i, k]]: Q summed over every offset landing on that token,
    # accumulated in offset order like the dense A (adding exact zeros for the others).
    same = (targets[:, :, None] == targets[:, None, :]).to(q.dtype)  # (N, 9 as k, 9 as k')
    weight = torch.zeros_like(q)
    for k2 in range(offsets):
        weight = weight + q[:, :, k2 : k2 + 1] * same[None, :, :, k2]
    best = weight.max(dim=-1, keepdim=True).values
    candidates = torch.where(weight == best, targets.expand(tiles, -1, -1), count)
    return candidates.min(dim=-1).values


def pointer_jump(parents: torch.Tensor, rounds: int) -> torch.Tensor:
    """Roots by pointer jumping: root <- root[root], at most `rounds` times or until unchanged.

    Args:
        parents: (T, N) long parent index of each token within its tile.
        rounds: upper bound on jumps.

    Returns:
        (T, N) long root of each token.
    """
    roots = parents
    for _ in range(rounds):
        jumped = roots.gather(1, roots)
        if torch.equal(jumped, roots):
            break
        roots = jumped
    return roots


def cluster_centres(features: torch.Tensor, roots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of each cluster, in the slot of its root.

    Args:
        features: (T, N, D) patch features.
        roots: (T, N) long root of each token.

    Returns:
        centres (T, N, D) (zero in slots no token has as root) and counts (T, N) long cluster sizes.
    """
    tiles, count, dim = features.shape
    # Summed in float32: a half-precision sum of a large homogeneous cluster (the sea this method
    # collapses) stops growing once it dwarfs a member, shrinking the mean.
    accumulate = torch.promote_types(features.dtype, torch.float32)
    sums = torch.zeros(tiles, count, dim, dtype=accumulate, device=features.device)
    sums = sums.scatter_add(1, roots[..., None].expand(-1, -1, dim), features.to(accumulate))
    sizes = torch.zeros(tiles, count, dtype=torch.long, device=roots.device).scatter_add_(1, roots, torch.ones_like(roots))
    return (sums / sizes.clamp_min(1)[..., None]).to(features.dtype), sizes


def anchored_scores(cls: torch.Tensor, centres: torch.Tensor, q_proj: nn.Linear, v_proj: nn.Linear) -> torch.Tensor:
    """score(c) = (W_q cls + b_q) . (W_v c + b_v) / sqrt(D) for every slot, in float32.

    Args:
        cls: (T, D) CLS token of each tile.
        centres: (T, N, D) cluster centres by slot.
        q_proj, v_proj: the selected tower layer's attention projections (D -> D).

    Returns:
        (T, N) scores.
    """
    dim = centres.shape[-1]
    query = nn.functional.linear(cls.float(), q_proj.weight.float(), None if q_proj.bias is None else q_proj.bias.float())
    value = nn.functional.linear(centres.float(), v_proj.weight.float(), None if v_proj.bias is None else v_proj.bias.float())
    return torch.einsum("td,tnd->tn", query, value) / math.sqrt(dim)


def select_slots(scores: torch.Tensor, sizes: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`keep` slots per tile, empty slots at -inf, re-sorted by slot index.

    Args:
        scores: (T, N) anchored scores.
        sizes: (T, N) cluster sizes (0 = empty slot).
        keep: slots kept per tile (clamped to N).

    Returns:
        slots (T, k) long ascending, and filled (T, k) bool: False on empty (zero-feature) slots.
        Ties, -inf ones included, go to the lower slot index (a stable sort).
    """
    keep = min(keep, scores.shape[1])
    masked = scores.masked_fill(sizes == 0, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :keep]
    slots = order.sort(dim=1).values
    return slots, sizes.gather(1, slots) > 0


@dataclass
class TileSelection:
    """What anchored selection keeps of T tiles: slot features and where they come from."""

    features: torch.Tensor
    """(T, k, D_v) centre of each kept slot (zeros on empty slots)."""
    slots: torch.Tensor
    """(T, k) long slot (= root token) index, ascending."""
    filled: torch.Tensor
    """(T, k) bool, False on empty slots."""
    roots: torch.Tensor
    """(T, N) long root of every token."""

    @staticmethod
    def cat(parts: list[TileSelection]) -> TileSelection:
        """Join the selections of consecutive tile chunks."""
        return TileSelection(
            features=torch.cat([p.features for p in parts]),
            slots=torch.cat([p.slots for p in parts]),
            filled=torch.cat([p.filled for p in parts]),
            roots=torch.cat([p.roots for p in parts]),
        )


def keep_every_token(features: torch.Tensor) -> TileSelection:
    """The unpruned selection of (T, g, g, D) tiles: every token is its own cluster, in raster order."""
    tiles, height, width, dim = features.shape
    count = height * width
    slots = torch.arange(count, device=features.device).expand(tiles, count)
    return TileSelection(
        features=features.reshape(tiles, count, dim),
        slots=slots,
        filled=torch.ones(tiles, count, dtype=torch.bool, device=features.device),
        roots=slots.clone(),
    )


def prune_tiles(
    features: torch.Tensor,
    cls: torch.Tensor,
    probs: torch.Tensor,
    q_proj: nn.Linear,
    v_proj: nn.Linear,
    keep: int,
    rounds: int,
) -> TileSelection:
    """Background token pruning + anchored selection of T tiles.

    Args:
        features: (T, g, g, D_v) patch features; cls: (T, D_v); probs: (T, g, g, 9) affinity.
        keep: MAX_TOKENS; rounds: pointer-jumping bound.
    """
    tiles, height, width, dim = features.shape
    flat = features.reshape(tiles, height * width, dim)
    roots = pointer_jump(affinity_parents(probs), rounds)
    centres, sizes = cluster_centres(flat, roots)
    slots, filled = select_slots(anchored_scores(cls, centres, q_proj, v_proj), sizes, keep)
    picked = centres.gather(1, slots[..., None].expand(-1, -1, dim))
    return TileSelection(features=picked, slots=slots, filled=filled, roots=roots)


def geollava_pinpoints(
    tile: int, budget: int, max_tokens_per_tile: int, max_tiles_per_side: int, max_tiles: int, max_aspect: int
) -> list[tuple[int, int]]:
    """(height, width) anyres grids GeoLLaVA may use under `budget`.

    The released list is every grid of 2..576 tiles whose long side is at most 49 times its short
    side (2,239 grids, up to 3 x 147 tiles), ordered by (width, height) as LongVA lists
    (width, height) pairs, which decides full ties. Grids whose clusters (tiles * max_tokens_per_tile,
    the most a tile keeps) exceed the budget are left out.
    """
    grids = []
    for cols in range(1, max_tiles_per_side + 1):
        for rows in range(1, max_tiles_per_side + 1):
            tiles = rows * cols
            fits = tiles * max_tokens_per_tile <= budget
            if 2 <= tiles <= max_tiles and max(rows, cols) <= max_aspect * min(rows, cols) and fits:
                grids.append((rows * tile, cols * tile))
    return grids


# ----------------------------------------------------------------------------------------------
# The strategy
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GeoLlavaEncoding(SceneEncoding):
    """A scene pruned by GeoLLaVA-8K; query-independent, so it holds the final tokens."""

    tokens: PrunedTokens
    layout: tiling.AnyresLayout
    pruned: bool = True
    """False when the single-tile case kept all g*g tokens."""


class GeoLlavaStrategy(PruningStrategy):
    """GeoLLaVA-8K background token pruning + anchored token selection (query-independent)."""

    name = "geollava"
    query_guided = False

    def _layout(self, width: int, height: int, config: UhrConfig) -> tiling.AnyresLayout:
        cfg, tile = self.config.geollava, config.tile_size
        per_tile = min(cfg.max_tokens_per_tile, config.patch_grid**2)  # a tile keeps at most its g*g tokens
        pinpoints = geollava_pinpoints(
            tile, self.config.budget, per_tile, cfg.max_tiles_per_side, cfg.max_tiles, cfg.max_aspect
        )
        pinpoint = tiling.select_pinpoint(width, height, pinpoints) if pinpoints else (tile, tile)
        return tiling.anyres_layout(width, height, pinpoint, tile)

    def views(self, config: UhrConfig, width: int, height: int) -> list[int]:
        """The one view the anyres canvas is resized from (never above the scene's own size)."""
        layout = self._layout(width, height, config)
        return [min(max(layout.resized), max(width, height))]

    def encode(self, model: UhrForConditionalGeneration, source: PixelSource) -> GeoLlavaEncoding:
        cfg = self.config.geollava
        budget = self.config.budget
        tile, grid = model.tile_size, model.patch_grid
        width, height = source.width, source.height
        layout = self._layout(width, height, model.config)
        (side,) = self.views(model.config, width, height)
        canvas = tiling.anyres_canvas(source.read_view(side), layout)
        tiles = torch.from_numpy(tiling.cut_tiles(canvas, tile))  # (T, S, S, 3)
        count = tiles.shape[0]
        per_tile = grid * grid
        keep_all = count == 1 and per_tile <= budget
        keep = min(cfg.max_tokens_per_tile, budget, per_tile)

        attention = model.selected_vision_layer.self_attn
        selections = []
        for chunk in tiles.split(cfg.chunk_tiles):
            tile_features, cls = model.encode_tiles(chunk)  # (t, g, g, D_v), (t, D_v)
            if keep_all:  # as released, a lone tile within the budget skips pruning
                selections.append(keep_every_token(tile_features))
                continue
            probs = model.reghead(tile_features)  # (t, g, g, 9)
            selections.append(
                prune_tiles(tile_features, cls, probs, attention.q_proj, attention.v_proj, keep, cfg.pointer_rounds)
            )
        tokens = self._tokens(model, TileSelection.cat(selections), layout, width, height)
        return GeoLlavaEncoding(
            grids=[], dense=count * per_tile, width=width, height=height, tokens=tokens, layout=layout, pruned=not keep_all
        )

    def _tokens(
        self,
        model: UhrForConditionalGeneration,
        selection: TileSelection,
        layout: tiling.AnyresLayout,
        width: int,
        height: int,
    ) -> PrunedTokens:
        """Project the kept slots (tiles in raster order, slots ascending) and attach their provenance."""
        features, slots, filled, roots = selection.features, selection.slots, selection.filled, selection.roots
        grid, cols = model.patch_grid, layout.cols
        count, keep, dim = features.shape
        device = slots.device
        emit = filled if not self.config.geollava.fill_empty_slots else torch.ones_like(filled)
        tile_of = torch.arange(count, device=device)[:, None].expand(-1, keep)[emit]  # (M,)
        slot_of = slots[emit]
        is_cluster = filled[emit]
        total = slot_of.shape[0]

        # Each emitted cluster is one group of the stitched grid: the tokens whose root is its slot.
        clusters = torch.nonzero(is_cluster).flatten()
        group_of_slot = torch.full((count, grid * grid), -1, dtype=torch.long, device=device)
        group_of_slot[tile_of[clusters], slot_of[clusters]] = torch.arange(clusters.numel(), device=device)
        token_group = group_of_slot.gather(1, roots)  # (T, g*g), -1 where the cluster was not kept
        # (rows * cols, g*g) -> (rows, cols, g, g) -> (rows, g, cols, g) -> stitched (rows * g, cols * g)
        stitched = token_group.reshape(layout.rows, cols, grid, grid).permute(0, 2, 1, 3).reshape(layout.rows * grid, cols * grid)
        boxes = cell_boxes(layout.scene_box(width, height), layout.rows * grid, cols * grid).to(device)
        provenance = group_provenance(stitched, clusters.numel(), boxes, grid, cols)

        # Filler tokens of empty slots sit on their slot's own cell and stand for no source token.
        row = (tile_of // cols) * grid + slot_of // grid
        col = (tile_of % cols) * grid + slot_of % grid
        box = boxes[row, col]
        tile = tile_of.clone()
        n_source = torch.zeros(total, dtype=torch.long, device=device)
        row[clusters], col[clusters], tile[clusters] = provenance.row, provenance.col, provenance.tile
        n_source[clusters], box[clusters] = provenance.n_source, provenance.box
        return PrunedTokens(
            embeds=model.project(features[emit].reshape(total, dim)),
            scale=torch.zeros(total, dtype=torch.long, device=device),
            row=row,
            col=col,
            tile=tile,
            n_source=n_source,
            box=box,
            dense=count * grid * grid,
        )

    def select(self, model: UhrForConditionalGeneration, encoding: SceneEncoding, question: str) -> PrunedTokens:
        if not isinstance(encoding, GeoLlavaEncoding):
            raise TypeError(f"geollava.select needs the GeoLlavaEncoding its encode made, got {type(encoding).__name__}")
        return encoding.tokens
