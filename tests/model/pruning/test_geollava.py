"""GeoLLaVA-8K background token pruning + anchored selection: hand-made tensors, then the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from uhr.model import tiling
from uhr.model.pruning.config import PruningConfig
from uhr.model.pruning.geollava import (
    GeoLlavaEncoding,
    GeoLlavaStrategy,
    affinity_parents,
    anchored_scores,
    cluster_centres,
    geollava_pinpoints,
    neighbour_targets,
    pointer_jump,
    prune_tiles,
    select_slots,
)
from uhr.scenes.source import ArraySource

OFFSET = {(dy, dx): k for k, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))}


def dense_affinity(probs: torch.Tensor) -> torch.Tensor:
    """Reference: the dense (T, N, N) A of the description, built one token and offset at a time."""
    tiles, height, width, _ = probs.shape
    a = torch.zeros(tiles, height * width, height * width, dtype=probs.dtype)
    for t in range(tiles):
        for y in range(height):
            for x in range(width):
                for (dy, dx), k in OFFSET.items():
                    ny, nx = min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)
                    a[t, y * width + x, ny * width + nx] += probs[t, y, x, k]
    return a


def one_hot_probs(height: int, width: int, offsets: dict[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
    """(1, H, W, 9) probabilities: 0.92 on the given offset of each listed cell, else on (0, 0)."""
    probs = torch.full((1, height, width, 9), 0.01)
    for y in range(height):
        for x in range(width):
            probs[0, y, x, OFFSET[offsets.get((y, x), (0, 0))]] = 0.92
    return probs


# -- affinity and parents ------------------------------------------------------------------------


def test_neighbours_are_clamped_at_the_border():
    targets = neighbour_targets(3, 4)
    # corner (0, 0): the four up/left offsets land on itself, the others on its right/lower neighbours
    assert targets[0].tolist() == [0, 0, 1, 0, 0, 1, 4, 4, 5]
    # interior (1, 1) = index 5: all nine distinct
    assert targets[5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]


def test_border_weight_piles_onto_the_token_itself():
    probs = torch.full((1, 3, 3, 9), 0.0)
    # corner token: its largest single probability points right (0, 1) ...
    probs[0, 0, 0] = torch.tensor([0.1, 0.1, 0.05, 0.1, 0.1, 0.3, 0.05, 0.1, 0.1])
    probs[0, :, :, 4] += (probs[0].sum(-1) == 0).float()  # others: all mass on themselves
    # ... but the four clamped offsets pile 0.4 onto itself, beating 0.05 + 0.3 on its right neighbour
    assert dense_affinity(probs)[0, 0, :2].tolist() == pytest.approx([0.4, 0.35])
    assert affinity_parents(probs)[0, 0].item() == 0


def test_parent_ties_go_to_the_smallest_index():
    probs = torch.zeros(1, 3, 3, 9)
    probs[..., 4] = 1.0
    probs[0, 1, 1] = 0.0
    probs[0, 1, 1, OFFSET[(0, 1)]] = 0.5  # right neighbour, index 5
    probs[0, 1, 1, OFFSET[(1, 0)]] = 0.5  # lower neighbour, index 7
    assert affinity_parents(probs)[0, 4].item() == 5


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_parents_match_the_dense_affinity_argmax(height, width, seed, quantised):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, height, width, 9, generator=generator, dtype=torch.float64)
    if quantised:  # coarse logits make exact ties between different neighbours common
        logits = logits.round()
    probs = logits.softmax(-1)
    assert torch.equal(affinity_parents(probs), dense_affinity(probs).argmax(-1))


def test_half_precision_neighbour_weights_are_summed_in_float32_as_released():
    # A left-border token whose clamped offsets pile two bf16 weights onto each of two tokens: in
    # float32 (the released dense A) the lower neighbour wins by 0.001, a bf16 sum ties them.
    weights = torch.tensor([0.10596, 0.13184, 0.10889, 0.08252, 0.11328, 0.11182, 0.15723, 0.08154, 0.10693])
    probs = torch.zeros(1, 3, 3, 9)
    probs[..., 4] = 1.0
    probs[0, 1, 0] = weights
    half = probs.bfloat16()
    released = dense_affinity(half.float()).argmax(-1)
    assert released[0, 3].item() == 6
    assert torch.equal(affinity_parents(half), released)


# -- pointer jumping -----------------------------------------------------------------------------


def test_pointer_jumping_follows_chains_to_their_root():
    parents = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])
    assert pointer_jump(parents, rounds=12).tolist() == [[0] * 8]
    # each round doubles the distance covered: 2 rounds reach 4 steps up the chain, not 7
    assert pointer_jump(parents, rounds=2).tolist() == [[0, 0, 0, 0, 0, 1, 2, 3]]


def test_a_mutual_pair_stays_two_roots():
    # 0 <-> 1, 2 -> 1, 3 -> 2
    roots = pointer_jump(torch.tensor([[1, 0, 1, 2]]), rounds=12)
    assert roots.tolist() == [[0, 1, 0, 1]]


def test_pointer_jumping_stops_when_stable():
    parents = torch.tensor([[0, 0, 2, 2]])
    assert torch.equal(pointer_jump(parents, rounds=1), parents)


# -- clusters ------------------------------------------------------------------------------------


def test_uniform_tile_collapses_to_one_cluster():
    grid = 6
    # a uniform tile: every token has the same features and the head the same preference (up-left);
    # on the border that offset is clamped onto the left or upper neighbour, at the corner onto itself
    probs = one_hot_probs(grid, grid, {(y, x): (-1, -1) for y in range(grid) for x in range(grid)})
    features = torch.zeros(1, grid, grid, 5) + torch.randn(5)
    roots = pointer_jump(affinity_parents(probs), rounds=12)
    assert torch.unique(roots).tolist() == [0]
    centres, sizes = cluster_centres(features.reshape(1, grid * grid, 5), roots)
    assert sizes[0, 0].item() == grid * grid and sizes[0, 1:].sum().item() == 0
    torch.testing.assert_close(centres[0, 0], features[0, 0, 0])


def test_two_region_tile_gives_two_clusters_with_exact_means():
    grid = 8
    offsets = {}
    for y in range(grid):
        for x in range(grid):
            if x in (0, 4):
                offsets[(y, x)] = (-1, 0) if y > 0 else (0, 0)  # region's first column points up
            else:
                offsets[(y, x)] = (0, -1)  # everyone else points left
    probs = one_hot_probs(grid, grid, offsets)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, grid * grid, 7, generator=generator, dtype=torch.float64)
    roots = pointer_jump(affinity_parents(probs), rounds=12)
    assert torch.unique(roots).tolist() == [0, 4]
    centres, sizes = cluster_centres(features, roots)
    left = torch.tensor([x < 4 for y in range(grid) for x in range(grid)])
    assert sizes[0, 0].item() == sizes[0, 4].item() == 32
    torch.testing.assert_close(centres[0, 0], features[0, left].mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(centres[0, 4], features[0, ~left].mean(0), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_cluster_centres_are_exact_means(count, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, count, 3, generator=generator, dtype=torch.float64)
    roots = torch.randint(0, count, (2, count), generator=generator)
    centres, sizes = cluster_centres(features, roots)
    for t in range(2):
        for slot in range(count):
            members = roots[t] == slot
            assert sizes[t, slot].item() == int(members.sum())
            expected = features[t, members].mean(0) if members.any() else torch.zeros(3, dtype=torch.float64)
            torch.testing.assert_close(centres[t, slot], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_a_large_half_precision_cluster_mean_is_the_float32_mean_rounded_once(device):
    # bf16 members in [1, 2.05) sum exactly in float32, so the centre is the float32 mean rounded
    # once; a bf16 sum (rounded to a multiple of 16 near 3000) is an ulp off in many channels, and
    # one kept in bf16 member by member stalls at 256.
    generator = torch.Generator().manual_seed(0)
    centre = 1 + torch.rand(1, 1, 64, generator=generator)
    features = (centre + 0.05 * torch.rand(1, 4000, 64, generator=generator)).bfloat16().to(device)
    roots = torch.zeros(1, 4000, dtype=torch.long, device=device)
    roots[0, 3000:] = 7
    centres, sizes = cluster_centres(features, roots)
    assert centres.dtype == torch.bfloat16 and sizes[0, 0].item() == 3000 and sizes[0, 7].item() == 1000
    assert torch.equal(centres[0, 0], (features[0, :3000].float().sum(0) / 3000).bfloat16())
    assert torch.equal(centres[0, 7], (features[0, 3000:].float().sum(0) / 1000).bfloat16())


# -- anchored selection --------------------------------------------------------------------------


def test_anchored_scores_are_the_formula():
    torch.manual_seed(0)
    dim = 6
    q_proj, v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    cls, centres = torch.randn(2, dim), torch.randn(2, 5, dim)
    with torch.no_grad():
        scores = anchored_scores(cls, centres, q_proj, v_proj)
    for t in range(2):
        query = (q_proj.weight @ cls[t] + q_proj.bias).detach()
        for n in range(5):
            value = (v_proj.weight @ centres[t, n] + v_proj.bias).detach()
            assert scores[t, n].item() == pytest.approx(float(query @ value) / math.sqrt(dim), rel=1e-5)


def test_selection_keeps_the_top_slots_in_spatial_order():
    scores = torch.tensor([[0.5, 9.0, -1.0, 3.0, 7.0, 2.0]])
    sizes = torch.tensor([[1, 2, 1, 0, 1, 1]])  # slot 3 is empty despite its score
    slots, filled = select_slots(scores, sizes, keep=3)
    assert slots.tolist() == [[1, 4, 5]] and filled.all()


def test_fewer_clusters_than_slots_fill_the_lowest_empty_slots():
    scores = torch.tensor([[1.0, 5.0, 0.0, 2.0, 0.0]])
    sizes = torch.tensor([[0, 3, 0, 2, 0]])
    slots, filled = select_slots(scores, sizes, keep=4)
    assert slots.tolist() == [[0, 1, 2, 3]]
    assert filled.tolist() == [[False, True, False, True]]


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_prune_tiles_keeps_at_most_max_tokens_per_tile_in_spatial_order(grid, keep, seed):
    generator = torch.Generator().manual_seed(seed)
    dim = 4
    features = torch.randn(3, grid, grid, dim, generator=generator)
    probs = torch.randn(3, grid, grid, 9, generator=generator).mul(3).softmax(-1)
    linear = nn.Linear(dim, dim).requires_grad_(False)
    selection = prune_tiles(features, torch.randn(3, dim, generator=generator), probs, linear, linear, keep, rounds=12)
    assert selection.slots.shape == (3, min(keep, grid * grid))
    assert bool((selection.slots[:, 1:] > selection.slots[:, :-1]).all())
    for t in range(3):
        real = set(torch.unique(selection.roots[t]).tolist())
        chosen = selection.slots[t][selection.filled[t]].tolist()
        assert set(chosen) <= real and len(chosen) == min(len(real), keep)
        assert torch.all(selection.features[t][~selection.filled[t]] == 0)


def test_pinpoints_respect_tiles_sides_aspect_and_budget():
    grids = geollava_pinpoints(336, budget=24 * 6, max_tokens_per_tile=24, max_tiles_per_side=3, max_tiles=9, max_aspect=2)
    assert (336, 336) not in grids and (672, 1008) in grids and (1008, 672) in grids
    assert (336, 1008) not in grids  # 1 x 3 tiles: aspect 3 > 2
    assert all(2 <= (h // 336) * (w // 336) <= 6 for h, w in grids)
    assert geollava_pinpoints(336, 47, 24, 147, 576, 49) == []


def test_a_per_tile_cap_above_the_tiles_tokens_does_not_shrink_the_grid(tiny_model, image_factory):
    # A tile keeps at most its 8 x 8 tokens, so a cap of 100 fits the same grids as a cap of 64.
    model, _ = tiny_model
    image = image_factory(60, 120, seed=0)
    layouts = []
    for cap in (64, 100):
        config = PruningConfig(
            strategy="geollava", budget=150, geollava={"max_tokens_per_tile": cap, "max_tiles_per_side": 4, "max_tiles": 8}
        )
        strategy = GeoLlavaStrategy(config)
        with torch.no_grad():
            encoding = strategy.encode(model, ArraySource(image))
        layouts.append(((encoding.layout.rows, encoding.layout.cols), len(encoding.tokens)))
    assert layouts[0] == layouts[1] == ((1, 2), 128)


def test_default_pinpoints_are_the_released_list():
    config = PruningConfig(strategy="geollava", budget=10**6).geollava
    grids = geollava_pinpoints(
        336, 10**6, config.max_tokens_per_tile, config.max_tiles_per_side, config.max_tiles, config.max_aspect
    )
    # GeoLLaVA-8K's training script lists 2,239 (width, height) grids from (336, 672) to (49392, 1008)
    assert len(grids) == 2239
    assert [(w, h) for h, w in grids] == sorted((w, h) for h, w in grids)
    assert (grids[0], grids[-1]) == ((672, 336), (1008, 49392))
    assert max(max(h, w) for h, w in grids) == 147 * 336 and max(h * w for h, w in grids) == 576 * 336 * 336


# -- the strategy on the tiny model ---------------------------------------------------------------


def _strategy(budget: int, keep: int = 5, fill: bool = True) -> GeoLlavaStrategy:
    return GeoLlavaStrategy(
        PruningConfig(
            strategy="geollava",
            budget=budget,
            geollava={"max_tokens_per_tile": keep, "max_tiles_per_side": 4, "max_tiles": 8, "fill_empty_slots": fill},
        )
    )


def test_encode_matches_the_algorithm_with_the_towers_own_projections(tiny_model, image_factory):
    model, _ = tiny_model
    image = image_factory(70, 100)
    strategy = _strategy(budget=40)
    with torch.no_grad():
        tokens = strategy.select(model, strategy.encode(model, ArraySource(image)), "anything")
        # recompute by hand: the layout, tiles, tower features, head, clusters, then the score formula
        tile, grid = model.tile_size, model.patch_grid
        layout = strategy._layout(100, 70, model.config)
        assert layout.rows * layout.cols * 5 <= 40 and layout.rows * layout.cols >= 2
        canvas = tiling.anyres_canvas(ArraySource(image).read_view(max(layout.resized)), layout)
        features, cls = model.encode_tiles(torch.from_numpy(tiling.cut_tiles(canvas, tile)))
        roots = pointer_jump(affinity_parents(model.reghead(features)), 12)
        centres, sizes = cluster_centres(features.reshape(features.shape[0], grid * grid, -1), roots)
        attention = model.selected_vision_layer.self_attn
        expected = []
        for t in range(features.shape[0]):
            query = attention.q_proj.weight @ cls[t] + attention.q_proj.bias
            value = centres[t] @ attention.v_proj.weight.T + attention.v_proj.bias
            score = (value @ query / math.sqrt(features.shape[-1])).masked_fill(sizes[t] == 0, float("-inf"))
            top = sorted(torch.sort(score, descending=True, stable=True).indices[:5].tolist())
            expected.append(model.project(centres[t, top]))
    assert len(tokens) == 5 * layout.rows * layout.cols <= 40
    torch.testing.assert_close(tokens.embeds, torch.cat(expected))


@pytest.mark.parametrize("fill", [True, False])
def test_provenance_counts_every_kept_cluster_member(tiny_model, fill):
    model, _ = tiny_model
    # a flat scene: fewer clusters than its 20 slots in some of its 1 x 3 tiles, so empty slots occur
    image = np.full((40, 90, 3), 120, dtype=np.uint8)
    image[:, 45:] = 30
    strategy = _strategy(budget=64, keep=20, fill=fill)
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image))
        tokens = strategy.select(model, encoding, "anything")
    assert isinstance(encoding, GeoLlavaEncoding)
    tiles = encoding.layout.rows * encoding.layout.cols
    assert tiles == 3 and len(tokens) <= 64 and len(tokens) <= 20 * tiles
    per_tile = torch.zeros(tiles, dtype=torch.long).index_add_(0, tokens.tile, tokens.n_source)
    assert bool((per_tile <= model.patch_grid**2).all())
    fillers = tokens.n_source == 0
    # without filling, a tile short of clusters emits fewer tokens, none of them fillers
    assert fill or (not fillers.any() and len(tokens) < 20 * tiles)
    if fill:
        assert len(tokens) == 20 * tiles and bool(fillers.any())
        # every filler is a zero feature through the projector
        zero = model.project(torch.zeros(1, model.config.vision_config.hidden_size))
        torch.testing.assert_close(tokens.embeds[fillers], zero.expand(int(fillers.sum()), -1))
    # tiles in raster order, and within a tile the slots (root cells) ascend
    assert bool((tokens.tile[1:] >= tokens.tile[:-1]).all())


def test_unfilled_tokens_are_the_filled_ones_without_the_fillers(tiny_model):
    model, _ = tiny_model
    image = np.full((40, 90, 3), 120, dtype=np.uint8)
    image[:, 45:] = 30
    tokens = {}
    for fill in (True, False):
        strategy = _strategy(budget=64, keep=20, fill=fill)
        with torch.no_grad():
            tokens[fill] = strategy.select(model, strategy.encode(model, ArraySource(image)), "anything")
    clusters = tokens[True].n_source > 0
    assert int((~clusters).sum()) > 0 and len(tokens[False]) == int(clusters.sum())
    for name in ("embeds", "row", "col", "tile", "n_source", "box"):
        torch.testing.assert_close(getattr(tokens[False], name), getattr(tokens[True], name)[clusters])


def test_one_tile_scene_keeps_all_tokens_when_they_fit(tiny_model, image_factory):
    model, _ = tiny_model
    grid = model.patch_grid
    image = image_factory(30, 30)
    kept = _strategy(budget=grid * grid, keep=40)  # 40 per tile: no two-tile grid fits the budget
    with torch.no_grad():
        encoding = kept.encode(model, ArraySource(image))
        tokens = kept.select(model, encoding, "q")
    assert not encoding.pruned and len(tokens) == grid * grid and bool((tokens.n_source == 1).all())
    pruned = _strategy(budget=30, keep=40)  # one tile over the budget: pruned to min(MAX_TOKENS, B) slots
    with torch.no_grad():
        encoding = pruned.encode(model, ArraySource(image))
    assert encoding.pruned and len(encoding.tokens) == 30
