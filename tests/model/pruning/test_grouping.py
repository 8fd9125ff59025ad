"""Group means and group provenance shared by the merging strategies: precision and rounding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uhr.model.pruning.grouping import cell_boxes, group_mean, group_provenance


def test_group_mean_is_the_mean_of_each_group_ignoring_unassigned_rows():
    values = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [100.0, 100.0]])
    groups = torch.tensor([0, 0, 1, -1])
    assert group_mean(values, groups, 2).tolist() == [[2.0, 20.0], [5.0, 50.0]]
    with pytest.raises(ValueError, match="no members"):
        group_mean(values, groups, 3)


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_a_large_half_precision_group_mean_is_the_float32_mean_rounded_once(device):
    # bf16 members in [1, 2.05): their sums are exact in float32 (20 significant bits), so a float32
    # accumulation gives the float32 mean rounded once to bf16. A bf16 accumulation rounds the sum
    # first (to a multiple of 16 near 3000) and misses that by an ulp in many of these 64 channels;
    # where it adds one member at a time in bf16 it stalls outright (at 256 for members near 1).
    generator = torch.Generator().manual_seed(0)
    centre = 1 + torch.rand(1, 64, generator=generator)
    values = (centre + 0.05 * torch.rand(4000, 64, generator=generator)).bfloat16().to(device)
    groups = torch.zeros(4000, dtype=torch.long, device=device)
    groups[3000:3990] = 1
    groups[3990:] = -1
    means = group_mean(values, groups, 2)
    assert means.dtype == torch.bfloat16
    expected = torch.stack([values[:3000].float().sum(0) / 3000, values[3000:3990].float().sum(0) / 990]).bfloat16()
    assert torch.equal(means, expected)


def test_provenance_rounds_the_centroid_half_up():
    # A 4 x 6 grid of 10-px cells, tiles of 2 x 2 cells, 3 tiles per row. Centroids (row, col):
    groups = torch.full((4, 6), -1, dtype=torch.long)
    cells = [
        [(0, 0), (1, 0)],  # (0.5, 0): an exact half goes up, to row 1
        [(2, 1), (3, 1), (3, 2), (2, 2), (3, 3)],  # (2.6, 1.8): both go up
        [(0, 4), (0, 5)],  # (0, 4.5): half up in the column too
        [(1, 3), (1, 4), (1, 5), (2, 3), (2, 4)],  # (1.4, 3.8): the row goes down
    ]
    for g, members in enumerate(cells):
        for r, c in members:
            groups[r, c] = g
    provenance = group_provenance(groups, 4, cell_boxes((0.0, 0.0, 60.0, 40.0), 4, 6), cells_per_tile=2, tiles_per_row=3)
    assert provenance.row.tolist() == [1, 3, 0, 1]
    assert provenance.col.tolist() == [0, 2, 5, 4]
    # the tile is the one holding the rounded centroid cell
    assert provenance.tile.tolist() == [0, 4, 2, 2]
    assert provenance.n_source.tolist() == [2, 5, 2, 5]
    assert provenance.box[0].tolist() == [0.0, 0.0, 10.0, 20.0] and provenance.box[1].tolist() == [10.0, 20.0, 40.0, 40.0]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_provenance_centroid_is_the_exactly_rounded_member_mean(height, width, count, seed):
    generator = torch.Generator().manual_seed(seed)
    count = min(count, height * width)
    flat = torch.cat([torch.arange(count), torch.randint(-1, count, (height * width - count,), generator=generator)])
    groups = flat[torch.randperm(height * width, generator=generator)].reshape(height, width)
    provenance = group_provenance(groups, count, cell_boxes((0.0, 0.0, 1.0, 1.0), height, width), 2, -(-width // 2))
    for g in range(count):
        where = torch.nonzero(groups == g)
        n = where.shape[0]
        # round half up in exact integer arithmetic: floor((2 * sum + n) / (2 n))
        row_sum, col_sum = int(where[:, 0].sum()), int(where[:, 1].sum())
        assert int(provenance.row[g]) == (2 * row_sum + n) // (2 * n)
        assert int(provenance.col[g]) == (2 * col_sum + n) // (2 * n)
        assert int(provenance.n_source[g]) == n
