"""Group means and group provenance, shared by the strategies that merge tokens.

A grouping of a token grid is an integer map with one group id per cell (`-1` = the cell is in no
group, e.g. dropped or padding). Every output token of `downsample` (pooled windows), `geollava`
(clusters), `uhr-bat` (kept tokens and merged remainders) and `c2f` (pooled cells) is one group, so
one pair of functions gives both its feature and its provenance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_mean(values: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of `values` over each group.

    Args:
        values: (N, D) features.
        groups: (N,) long group id of each row in [-1, count); -1 rows are ignored.
        count: number of groups G; every group must have at least one member.

    Returns:
        (G, D) means, differentiable with respect to `values`.
    """
    if values.shape[0] != groups.shape[0]:
        raise ValueError(f"group_mean got {values.shape[0]} values but {groups.shape[0]} group ids")
    member = groups >= 0
    ids = groups[member]
    sizes = torch.zeros(count, dtype=torch.long, device=groups.device).index_add_(0, ids, torch.ones_like(ids))
    if bool((sizes == 0).any()):
        raise ValueError(f"group_mean: groups {torch.nonzero(sizes == 0).flatten().tolist()} have no members")
    # Summed in float32 (a half-precision sum of a large group stops growing once it dwarfs a member).
    accumulate = torch.promote_types(values.dtype, torch.float32)
    sums = torch.zeros(count, values.shape[1], dtype=accumulate, device=values.device)
    sums = sums.index_add(0, ids, values[member].to(accumulate))
    return (sums / sizes[:, None]).to(values.dtype)


def cell_boxes(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """(height, width, 4) scene-pixel boxes of a regular token grid spanning `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    xs = torch.linspace(x0, x1, width + 1, dtype=torch.float64)
    ys = torch.linspace(y0, y1, height + 1, dtype=torch.float64)
    left, right = xs[:-1].expand(height, width), xs[1:].expand(height, width)
    top, bottom = ys[:-1, None].expand(height, width), ys[1:, None].expand(height, width)
    return torch.stack([left, top, right, bottom], dim=-1).float()


@dataclass
class GroupProvenance:
    """Per-group provenance on one scale's token grid (see `PrunedTokens`)."""

    row: torch.Tensor
    """(G,) long, members' centroid row (rounded half up)."""
    col: torch.Tensor
    """(G,) long, members' centroid column."""
    tile: torch.Tensor
    """(G,) long, raster index of the tile holding the centroid cell."""
    n_source: torch.Tensor
    """(G,) long, number of member cells."""
    box: torch.Tensor
    """(G, 4) float, bounding box (x0, y0, x1, y1) of the members' scene-pixel boxes."""


def group_provenance(
    groups: torch.Tensor, count: int, boxes: torch.Tensor, cells_per_tile: int, tiles_per_row: int
) -> GroupProvenance:
    """Centroid cell, tile, size and bounding box of every group of a token grid.

    Args:
        groups: (H, W) long group id of each cell in [-1, count); every group must be non-empty.
        count: number of groups G.
        boxes: (H, W, 4) scene-pixel box of each cell.
        cells_per_tile: cells per tile side of this grid (g, or g // pool for pooled grids).
        tiles_per_row: tiles per row of this grid.
    """
    height, width = groups.shape
    device = groups.device
    flat = groups.reshape(-1)
    member = flat >= 0
    ids = flat[member]
    rows = torch.arange(height, device=device).repeat_interleave(width)[member]
    cols = torch.arange(width, device=device).repeat(height)[member]
    sizes = torch.zeros(count, dtype=torch.long, device=device).index_add_(0, ids, torch.ones_like(ids))
    if bool((sizes == 0).any()):
        raise ValueError(f"group_provenance: groups {torch.nonzero(sizes == 0).flatten().tolist()} have no members")
    denominator = sizes.double()
    row_mean = torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, ids, rows.double()) / denominator
    col_mean = torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, ids, cols.double()) / denominator
    row = torch.floor(row_mean + 0.5).long()
    col = torch.floor(col_mean + 0.5).long()
    member_boxes = boxes.reshape(-1, 4)[member].to(torch.float32)
    low = torch.full((count, 2), float("inf"), device=device)
    high = torch.full((count, 2), float("-inf"), device=device)
    low = low.scatter_reduce(0, ids[:, None].expand(-1, 2), member_boxes[:, :2], reduce="amin")
    high = high.scatter_reduce(0, ids[:, None].expand(-1, 2), member_boxes[:, 2:], reduce="amax")
    tile = (row // cells_per_tile) * tiles_per_row + col // cells_per_tile
    return GroupProvenance(row=row, col=col, tile=tile, n_source=sizes, box=torch.cat([low, high], dim=1))
