"""UHR-BAT: query-guided multi-scale importance + region-wise preserve-and-merge under a budget.

Per scene (`encode`, query-independent):

* Views at the configured longest sides (`PruningConfig.scales`, coarsest = the anchor). A side
  beyond the scene's own longest side is clamped to it, and scales that clamp to the same side are
  merged into one view (upsampling adds no information): it keeps the first such scale's index
  (its learned scale embedding) and the sum of their budgets.
* Each view is encoded, projected, and given the scale-specific positional term of eq. 5,
  h = e + p + q (`model.scale_embedding`, its position table laid over the scene's extent in the
  view's tokens so a scene location gets the same p at every scale). Tokens that see only padding
  are dropped.
* Each scale is partitioned into regions (appendix C.2): k-means (MiniBatch k-means above
  `minibatch_above` tokens) or BIRCH on [f / ||f||, w * x, w * y], f the tower feature, (x, y) the
  token centre divided by the valid grid's longest side (isotropic, in [0, 1]).
* Per-scale budgets B_s: given, or allocated (see `allocate_budgets`).

Per question (`select`):

* Importance a_i on the anchor scale: the LM's text-to-vision attention at `importance_layer`,
  averaged over heads and question tokens (eq. 2). The anchor tokens come before the question in
  the prompt, so the LM runs over them once per scene (`importance_prefix`, made by the first
  question) and over each question's own text after that.
* Cross-scale alignment (eq. 6-7, C.3): the anchor map is carried to every other scale by bilinear
  interpolation at the half-pixel-centre resize mapping tau_s; a patch token covers exactly one
  cell of its grid, so its importance (eq. 7's mean over its cells) is the value at its cell. tau_s
  steps by the ratio of the two grids' token sizes in scene pixels, which is their size ratio when
  both grids span the scene exactly; a valid grid whose last row or column sees only part of a
  token's worth of scene would otherwise shift the map, by up to half an anchor token at the far edge.
* Region-wise preserve-and-merge (eq. 8-12, Algorithm 1): in each region keep the tokens with
  a_i >= the region mean, merge the rest into their mean (one token, after the region's kept
  tokens); regions by descending mean importance, kept tokens by descending importance.
* Budget: the candidate sequence is cut to B_s. A plain cut of eq. 12's sequence would let the
  first regions take the whole budget, contradicting §3.3's guarantee that B_s >= R_s leaves every
  region a token; so the top token of each of the first min(R_s, B_s) regions is reserved and the
  rest of B_s goes to the other candidates in sequence order. The output keeps sequence order.
  `reserve_regions=False` cuts plainly instead, as Algorithm 1's line 27 writes it (E_cand[1:B_s]).

Scales are emitted coarse to fine. `dense` counts the valid tokens of all scales.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.cluster import Birch, KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from uhr.model import tiling
from uhr.model.pruning.base import PrunedTokens, PruningStrategy, SceneEncoding, TokenGrid
from uhr.model.pruning.config import PartitionMethod, UhrBatConfig
from uhr.model.pruning.grouping import group_mean, group_provenance
from uhr.scenes.source import PixelSource

if TYPE_CHECKING:
    from uhr.model.config import UhrConfig
    from uhr.model.modeling import ImportancePrefix, UhrForConditionalGeneration


# ----------------------------------------------------------------------------------------------
# Scales and budgets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleView:
    """One whole-scene view UHR-BAT encodes."""

    index: int
    """Index of the configured scale it stands for (its scale embedding row)."""
    side: int
    """Longest side read from the source."""
    merged: tuple[int, ...]
    """Configured scale indices clamped onto this view (their budgets add up)."""


def effective_scales(scales: list[int], width: int, height: int) -> list[ScaleView]:
    """Configured longest sides clamped to the scene's own, equal ones merged, coarsest first."""
    longest = max(width, height)
    views: list[ScaleView] = []
    for index, side in enumerate(scales):
        side = min(side, longest)
        if views and views[-1].side == side:
            views[-1] = ScaleView(views[-1].index, side, views[-1].merged + (index,))
        else:
            views.append(ScaleView(index, side, (index,)))
    return views


def allocate_budgets(budget: int, tokens: list[int], regions: list[int]) -> list[int]:
    """Per-scale budgets B_s, larger for scales with more tokens, none above its scale's N_s.

    If the regions fit (sum R_s <= B), every scale first gets B_s = R_s (one slot per region, the
    paper's minimum capacity); the remaining budget is split in proportion to the scales' token
    counts N_s. Otherwise the whole budget is split in proportion to N_s. Splits use the largest
    remainder; ties go to the finer scale. A share beyond a scale's N_s could not be used there, so
    it is split again over the scales with room: sum B_s == min(B, sum N_s).
    """
    if len(tokens) != len(regions) or not tokens:
        raise ValueError(f"allocate_budgets needs one token and region count per scale, got {tokens} and {regions}")
    budgets = list(regions) if sum(regions) <= budget else [0] * len(tokens)
    extra = min(budget, sum(tokens)) - sum(budgets)
    while extra > 0:
        room = [s for s in range(len(tokens)) if budgets[s] < tokens[s]]
        for s, share in zip(room, _proportional(extra, [tokens[s] for s in room])):
            budgets[s] += share
        extra = sum(max(0, b - n) for b, n in zip(budgets, tokens))
        budgets = [min(b, n) for b, n in zip(budgets, tokens)]
    return budgets


def _proportional(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` by the largest remainder, ties to the later weight."""
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    for s in sorted(range(len(weights)), key=lambda s: (-remainders[s], -s))[: total - sum(shares)]:
        shares[s] += 1
    return shares


# ----------------------------------------------------------------------------------------------
# Cross-scale importance alignment (eq. 6, appendix C.3)
# ----------------------------------------------------------------------------------------------


def resize_coordinates(size_out: int, size_in: int, step: float | None = None) -> torch.Tensor:
    """tau along one axis: output cell centre -> continuous input coordinate, clamped to [0, size_in - 1].

    `step` is one output cell measured in input cells; by default size_in / size_out, the two grids
    spanning the same extent. A step equal to that ratio up to rounding is taken as the ratio itself.
    """
    ratio = size_in / size_out
    step = ratio if step is None or math.isclose(step, ratio, rel_tol=1e-9) else step
    positions = (torch.arange(size_out, dtype=torch.float64) + 0.5) * step - 0.5
    return positions.clamp(0.0, size_in - 1)


def token_step(anchor: TokenGrid, target: TokenGrid) -> tuple[float, float]:
    """(rows, cols) size of one `target` token in `anchor` tokens, both measured in scene pixels."""
    (a_rows, a_cols), (t_rows, t_cols) = anchor.shape, target.shape
    ax0, ay0, ax1, ay1 = anchor.box
    tx0, ty0, tx1, ty1 = target.box
    return ((ty1 - ty0) / t_rows) / ((ay1 - ay0) / a_rows), ((tx1 - tx0) / t_cols) / ((ax1 - ax0) / a_cols)


def align_importance(anchor: torch.Tensor, size: tuple[int, int], step: tuple[float, float] | None = None) -> torch.Tensor:
    """Carry the anchor importance map onto an (H, W) grid by bilinear interpolation (eq. 16).

    For target cell (u, v), (y, x) = tau(u, v); x0 = floor(x), x1 = x0 + 1, likewise y, and
    Psi = Q00 (x1 - x)(y1 - y) + Q10 (x - x0)(y1 - y) + Q01 (x1 - x)(y - y0) + Q11 (x - x0)(y - y0)
    with Q_mn = G(x_m, y_n); a corner beyond the last row/column has zero weight.

    Args:
        anchor: (h1, w1) importance of the anchor scale's token grid.
        size: (H, W) target token grid.
        step: (rows, cols) size of a target token in anchor tokens (`token_step`); None when both
            grids span the same extent.

    Returns:
        (H, W) aligned importance, in the anchor's dtype.
    """
    height_in, width_in = anchor.shape
    grid = anchor.double()
    step_y, step_x = (None, None) if step is None else step
    y = resize_coordinates(size[0], height_in, step_y).to(grid.device)
    x = resize_coordinates(size[1], width_in, step_x).to(grid.device)
    y0, x0 = y.floor().long(), x.floor().long()
    y1, x1 = (y0 + 1).clamp(max=height_in - 1), (x0 + 1).clamp(max=width_in - 1)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    q00, q10 = grid[y0][:, x0], grid[y0][:, x1]
    q01, q11 = grid[y1][:, x0], grid[y1][:, x1]
    value = q00 * (1 - wx) * (1 - wy) + q10 * wx * (1 - wy) + q01 * (1 - wx) * wy + q11 * wx * wy
    return value.to(anchor.dtype)


# ----------------------------------------------------------------------------------------------
# Region partition (appendix C.2)
# ----------------------------------------------------------------------------------------------


def clustering_embedding(features: torch.Tensor, coord_weight: float) -> np.ndarray:
    """(rows * cols, D + 2) float32 u_i = [f_i / ||f_i||, w * x_i, w * y_i] (eq. 13) of a valid
    token grid `features` (rows, cols, D), in raster order.

    (x, y) is the token's centre (col + 0.5, row + 0.5) divided by the grid's longest side, so both
    axes share one unit.
    """
    rows, cols, dim = features.shape
    unit = features.detach().float().reshape(rows * cols, dim)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    extent = max(rows, cols)
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    xy = torch.stack([(x.reshape(-1) + 0.5) / extent, (y.reshape(-1) + 0.5) / extent], dim=1).to(unit.device)
    return torch.cat([unit, coord_weight * xy], dim=1).cpu().numpy()


def partition_regions(embedding: np.ndarray, config: UhrBatConfig) -> np.ndarray:
    """(N,) int64 region of each token, ids 0..R-1.

    k-means (eq. 14; MiniBatch above `minibatch_above` tokens) or BIRCH with `regions` clusters and
    a fixed seed. A scale with at most `regions` tokens gets one region per token; clusters that
    come out empty are dropped, so R <= `regions`.
    """
    count = embedding.shape[0]
    k = config.regions
    if count <= k:
        return np.arange(count, dtype=np.int64)
    with warnings.catch_warnings():
        # Scenes with fewer distinct tokens than k (flat water, nodata) are normal input.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if config.partition is PartitionMethod.BIRCH:
            model = Birch(n_clusters=k, threshold=config.birch_threshold)
        elif count > config.minibatch_above:
            model = MiniBatchKMeans(
                n_clusters=k,
                batch_size=config.minibatch_size,
                max_iter=config.kmeans_max_iter,
                n_init=1,
                random_state=config.seed,
            )
        else:
            model = KMeans(n_clusters=k, n_init=1, max_iter=config.kmeans_max_iter, random_state=config.seed)
        labels = model.fit_predict(embedding)
    _, regions = np.unique(labels, return_inverse=True)
    return regions.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Region-wise preserve-and-merge (eq. 8-12, Algorithm 1) with the budget cut
# ----------------------------------------------------------------------------------------------


@dataclass
class RegionSelection:
    """The budgeted candidate sequence of one scale."""

    embeds: torch.Tensor
    """(M, D) output tokens in sequence order."""
    assignment: torch.Tensor
    """(N,) long output index each input token went into; -1 if cut by the budget."""
    region: torch.Tensor
    """(M,) long region of each output token."""
    merged: torch.Tensor
    """(M,) bool, True on a region's merged token."""
    region_mean: torch.Tensor
    """(R,) float64 mean importance mu_m of every region (eq. 8)."""


def preserve_and_merge(
    embeds: torch.Tensor, importance: torch.Tensor, regions: torch.Tensor, budget: int, reserve_regions: bool = True
) -> RegionSelection:
    """Region-wise preserve-and-merge of one scale, cut to `budget` tokens.

    Args:
        embeds: (N, D) tokens h_i (LM space, positional term included).
        importance: (N,) aligned importance a_i.
        regions: (N,) long region ids 0..R-1, each region non-empty.
        budget: B_s.
        reserve_regions: reserve each of the first min(R, B_s) regions' top token before the cut
            (the default); False keeps the first B_s candidates, Algorithm 1's plain cut.

    Returns:
        The selection; merged tokens are exact means of their merged sets, kept tokens are copies.
    """
    count = importance.shape[0]
    device = importance.device
    if embeds.shape[0] != count or regions.shape[0] != count:
        raise ValueError(f"preserve_and_merge got {embeds.shape[0]} tokens, {count} scores, {regions.shape[0]} region ids")
    num_regions = int(regions.max()) + 1
    sizes = torch.bincount(regions, minlength=num_regions)
    if bool((sizes == 0).any()):
        raise ValueError("preserve_and_merge needs region ids 0..R-1 with every region non-empty")
    score = importance.double()
    mean = torch.zeros(num_regions, dtype=torch.float64, device=device).index_add_(0, regions, score) / sizes
    rank = torch.empty(num_regions, dtype=torch.long, device=device)
    rank[torch.sort(mean, descending=True, stable=True).indices] = torch.arange(num_regions, device=device)

    # Tokens ordered by (region rank, importance descending, index): two stable sorts.
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(rank[regions[order]], stable=True).indices]
    first = torch.ones(count, dtype=torch.bool, device=device)
    first[1:] = regions[order[1:]] != regions[order[:-1]]
    # a_i >= mu_m, with float64 rounding of the mean forgiven so a uniform region keeps all its tokens
    keep = score >= mean[regions] - 1e-12 * mean[regions].abs()
    keep[order[first]] = True  # the top token is >= the mean by construction (Lemma 1)

    kept_tokens = order[keep[order]]
    merge_regions = torch.unique(regions[~keep])
    candidate_region = torch.cat([regions[kept_tokens], merge_regions])
    candidate_token = torch.cat([kept_tokens, torch.full_like(merge_regions, -1)])
    key = rank[candidate_region] * 2 + (candidate_token < 0).long()  # kept tokens, then the merged one
    sequence = torch.sort(key, stable=True).indices
    candidate_region, candidate_token = candidate_region[sequence], candidate_token[sequence]

    # Budget: reserve each of the first min(R, B_s) regions' top token, then fill in sequence order.
    leading = torch.ones_like(candidate_region, dtype=torch.bool)
    leading[1:] = candidate_region[1:] != candidate_region[:-1]
    reserved = leading & (rank[candidate_region] < budget) & reserve_regions
    others = ~reserved
    room = budget - int(reserved.sum())
    chosen = reserved | (others & (torch.cumsum(others.long(), 0) <= room))
    candidate_region, candidate_token = candidate_region[chosen], candidate_token[chosen]

    outputs = candidate_region.shape[0]
    assignment = torch.full((count,), -1, dtype=torch.long, device=device)
    is_merged = candidate_token < 0
    kept_out = torch.nonzero(~is_merged).flatten()
    assignment[candidate_token[kept_out]] = kept_out
    output_of_merged_region = torch.full((num_regions,), -1, dtype=torch.long, device=device)
    merged_out = torch.nonzero(is_merged).flatten()
    output_of_merged_region[candidate_region[merged_out]] = merged_out
    rest = ~keep
    assignment[rest] = output_of_merged_region[regions[rest]]
    return RegionSelection(
        embeds=group_mean(embeds, assignment, outputs),
        assignment=assignment,
        region=candidate_region,
        merged=is_merged,
        region_mean=mean,
    )


# ----------------------------------------------------------------------------------------------
# The strategy
# ----------------------------------------------------------------------------------------------


@dataclass
class ScaleTokens:
    """One scale's query-independent state."""

    view: ScaleView
    grid: TokenGrid
    rows: int
    """Valid token rows (padding is bottom/right only)."""
    cols: int
    embeds: torch.Tensor
    """(rows * cols, D) h = e + p + q, raster order over the valid grid."""
    regions: torch.Tensor
    """(rows * cols,) long region ids."""
    budget: int
    """B_s."""


@dataclass(kw_only=True)
class UhrBatEncoding(SceneEncoding):
    """Multi-scale tokens with their region partitions and budgets."""

    scales: list[ScaleTokens]
    anchor_prefix: ImportancePrefix | None = None
    """The anchor scale's tokens run through the LM for scoring, made by the first question."""


def middle_layer(model: UhrForConditionalGeneration, layer: int | None) -> int:
    """The configured LM layer, or the middle one when None."""
    return model.config.text_config.num_hidden_layers // 2 if layer is None else layer


class UhrBatStrategy(PruningStrategy):
    """UHR-BAT budget-aware token compression."""

    name = "uhr-bat"
    query_guided = True

    def views(self, config: UhrConfig, width: int, height: int) -> list[int]:
        """The clamped, merged scale sides, coarsest first."""
        return [view.side for view in effective_scales(self.config.scales, width, height)]

    def encode(self, model: UhrForConditionalGeneration, source: PixelSource) -> UhrBatEncoding:
        cfg = self.config.uhr_bat
        width, height = source.width, source.height
        views = effective_scales(self.config.scales, width, height)
        encoded = []
        for view in views:
            pixels = source.read_view(view.side)
            box = tiling.padded_box(width, height, pixels.shape[1], pixels.shape[0], model.tile_size)
            grid = model.encode_view(pixels, scale=view.index, box=box)
            rows, cols = int(grid.valid.any(dim=1).sum()), int(grid.valid.any(dim=0).sum())
            features = grid.stitched()[:rows, :cols]  # (rows, cols, D_v), padding dropped
            patch = model.config.vision_config.patch_size
            extent = (pixels.shape[0] / patch, pixels.shape[1] / patch)  # the scene in this view's tokens
            position = model.scale_embedding(view.index, rows, cols, extent).reshape(rows * cols, -1)  # p + q (eq. 5)
            embeds = model.project(features.reshape(rows * cols, -1)) + position.to(features.device)
            embedding = clustering_embedding(features, cfg.coord_weight)
            regions = torch.from_numpy(partition_regions(embedding, cfg)).to(features.device)
            encoded.append((grid, rows, cols, embeds, regions))
        tokens = [rows * cols for _, rows, cols, _, _ in encoded]
        budgets = self._budgets(views, tokens, [int(regions.max()) + 1 for *_, regions in encoded])
        scales = [
            ScaleTokens(view=view, grid=grid, rows=rows, cols=cols, embeds=embeds, regions=regions, budget=budget)
            for view, (grid, rows, cols, embeds, regions), budget in zip(views, encoded, budgets)
        ]
        dense = sum(scale.rows * scale.cols for scale in scales)
        return UhrBatEncoding(grids=[scale.grid for scale in scales], dense=dense, width=width, height=height, scales=scales)

    def _budgets(self, views: list[ScaleView], tokens: list[int], regions: list[int]) -> list[int]:
        """B_s: the configured ones (summed over merged scales) or `allocate_budgets`."""
        if self.config.scale_budgets is not None:
            return [sum(self.config.scale_budgets[i] for i in view.merged) for view in views]
        return allocate_budgets(self.config.budget, tokens, regions)

    def anchor_importance(self, model: UhrForConditionalGeneration, encoding: UhrBatEncoding, question: str) -> torch.Tensor:
        """(rows, cols) importance of the anchor scale's valid tokens: eq. 2 at `importance_layer`."""
        anchor = encoding.scales[0]
        if encoding.anchor_prefix is None:  # the scene's first question
            layer = middle_layer(model, self.config.uhr_bat.importance_layer)
            encoding.anchor_prefix = model.importance_prefix(anchor.embeds, layer=layer)
        scores = model.prefixed_importance(encoding.anchor_prefix, question, query="mean")
        return scores.reshape(anchor.rows, anchor.cols).to(anchor.embeds.device)

    def select(self, model: UhrForConditionalGeneration, encoding: SceneEncoding, question: str) -> PrunedTokens:
        if not isinstance(encoding, UhrBatEncoding):
            raise TypeError(f"uhr-bat.select needs the UhrBatEncoding its encode made, got {type(encoding).__name__}")
        anchor_map = self.anchor_importance(model, encoding, question)
        parts = []
        for scale in encoding.scales:
            step = token_step(encoding.scales[0].grid, scale.grid)
            aligned = align_importance(anchor_map, (scale.rows, scale.cols), step)
            selection = preserve_and_merge(
                scale.embeds, aligned.reshape(-1), scale.regions, scale.budget, self.config.uhr_bat.reserve_regions
            )
            parts.append(self._tokens(scale, selection, encoding.dense))
        return PrunedTokens.concat(parts, dense=encoding.dense)

    @staticmethod
    def _tokens(scale: ScaleTokens, selection: RegionSelection, dense: int) -> PrunedTokens:
        grid = scale.grid
        device = selection.assignment.device
        groups = torch.full(grid.shape, -1, dtype=torch.long, device=device)
        groups[: scale.rows, : scale.cols] = selection.assignment.reshape(scale.rows, scale.cols)
        count = selection.embeds.shape[0]
        provenance = group_provenance(groups, count, grid.token_boxes().to(device), grid.patch_grid, grid.tiles[1])
        return PrunedTokens(
            embeds=selection.embeds,
            scale=torch.full((count,), scale.view.index, dtype=torch.long, device=device),
            row=provenance.row,
            col=provenance.col,
            tile=provenance.tile,
            n_source=provenance.n_source,
            box=provenance.box,
            dense=dense,
        )


__all__ = [
    "RegionSelection",
    "ScaleView",
    "UhrBatEncoding",
    "UhrBatStrategy",
    "align_importance",
    "allocate_budgets",
    "clustering_embedding",
    "effective_scales",
    "partition_regions",
    "preserve_and_merge",
    "resize_coordinates",
    "token_step",
]
