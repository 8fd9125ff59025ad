"""UHR-BAT: scales, budgets, cross-scale alignment, region partition and preserve-and-merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from uhr.model.pruning.config import PartitionMethod, PruningConfig, UhrBatConfig
from uhr.model.pruning.uhr_bat import (
    UhrBatEncoding,
    UhrBatStrategy,
    align_importance,
    allocate_budgets,
    clustering_embedding,
    effective_scales,
    partition_regions,
    preserve_and_merge,
    resize_coordinates,
    token_step,
)
from uhr.scenes.source import ArraySource

# -- scales and budgets --------------------------------------------------------------------------


def test_scales_beyond_the_scene_are_clamped_and_merged():
    views = effective_scales([672, 1344, 2688, 4032], width=2000, height=1500)
    assert [(v.index, v.side, v.merged) for v in views] == [(0, 672, (0,)), (1, 1344, (1,)), (2, 2000, (2, 3))]
    assert [v.side for v in effective_scales([672, 1344], 300, 500)] == [500]


def test_budget_allocation_rule():
    # regions fit: one slot per region first, the rest in proportion to tokens (largest remainder)
    assert allocate_budgets(1000, tokens=[100, 400, 1600], regions=[10, 10, 10]) == [56, 195, 749]
    # regions do not fit: the whole budget in proportion to tokens
    assert allocate_budgets(20, tokens=[100, 300], regions=[16, 16]) == [5, 15]
    # a share a scale cannot use goes to the others: 16 regions of 16 tokens leave no room at scale 0
    assert allocate_budgets(1024, tokens=[16, 5360], regions=[16, 16]) == [16, 1008]
    assert allocate_budgets(300, tokens=[10, 100, 1000], regions=[10, 16, 16]) == [10, 39, 251]
    assert allocate_budgets(5000, tokens=[10, 20], regions=[3, 3]) == [10, 20]
    # equal remainders: the extra token goes to the finer scale
    assert allocate_budgets(5, tokens=[10, 10], regions=[3, 3]) == [2, 3]
    assert allocate_budgets(2, tokens=[10, 30], regions=[2, 2]) == [0, 2]  # remainders 20 and 20 of 40
    assert allocate_budgets(7, tokens=[10, 10, 10], regions=[1, 1, 1]) == [2, 2, 3]  # 4 extra: 1 each, then the finest


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 5000),
    st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 64)), min_size=1, max_size=5),
)
def test_budget_allocation_properties(budget, scales):
    scales = sorted(scales)  # finer scales have more tokens
    tokens = [n for n, _ in scales]
    regions = [min(r, n) for n, r in scales]
    budgets = allocate_budgets(budget, tokens, regions)
    # the whole budget is given out, none of it where a scale has no token left to fill it with
    assert sum(budgets) == min(budget, sum(tokens)) and all(0 <= b <= n for b, n in zip(budgets, tokens))
    if sum(regions) <= budget:
        assert all(b >= r for b, r in zip(budgets, regions))
        extra = [b - r for b, r in zip(budgets, regions)]
    else:
        extra = budgets
    # proportional shares: more tokens never means a smaller share (up to the one-token remainder)
    # among the scales their token count does not cap
    for s in range(len(tokens) - 1):
        if tokens[s] <= tokens[s + 1] and budgets[s] < tokens[s] and budgets[s + 1] < tokens[s + 1]:
            assert extra[s] <= extra[s + 1] + 1


# -- cross-scale alignment -----------------------------------------------------------------------


def test_alignment_is_the_bilinear_formula_on_a_hand_made_map():
    anchor = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    aligned = align_importance(anchor, (4, 4))
    # target cell (1, 2): tau = ((1 + .5) * 2/4 - .5, (2 + .5) * 2/4 - .5) = (0.25, 0.75)
    y, x = 0.25, 0.75
    q00, q10, q01, q11 = 0.0, 1.0, 2.0, 4.0  # G(x0,y0), G(x1,y0), G(x0,y1), G(x1,y1)
    expected = q00 * (1 - x) * (1 - y) + q10 * x * (1 - y) + q01 * (1 - x) * y + q11 * x * y
    assert aligned[1, 2].item() == pytest.approx(expected)
    # corners clamp to the anchor's corners
    assert aligned[0, 0].item() == 0.0 and aligned[3, 3].item() == 4.0
    assert resize_coordinates(4, 2).tolist() == [0.0, 0.25, 0.75, 1.0]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_alignment_equals_torch_bilinear_resize(h1, w1, h, w, seed):
    anchor = torch.rand(h1, w1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = F.interpolate(anchor[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(align_importance(anchor, (h, w)), expected, rtol=1e-10, atol=1e-12)


def test_alignment_onto_the_same_grid_is_the_identity():
    anchor = torch.rand(5, 7)
    assert torch.equal(align_importance(anchor, (5, 7)), anchor)


def test_alignment_steps_by_token_size_when_a_grid_is_partly_padded():
    # A 25-px-tall scene: anchor tokens of 10 px (3 rows, the last seeing 5 px), target tokens of 5 px (5 rows).
    anchor = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)
    aligned = align_importance(anchor, (5, 1), step=(0.5, 1.0))
    # target row 4 (scene 20-25 px, centre 22.5) sits at anchor coordinate 22.5 / 10 - 0.5 = 1.75
    assert aligned[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.75])
    # the size ratio 3 / 5 would put it at 2.2, past the anchor's last row
    assert align_importance(anchor, (5, 1))[4, 0].item() == 1.0
    assert resize_coordinates(4, 2, step=0.5 * (1 + 1e-12)).tolist() == resize_coordinates(4, 2).tolist()


def test_alignment_follows_scene_pixels_on_partly_padded_views(tiny_model, image_factory):
    model, _ = tiny_model
    # 200 x 150: the 40-px anchor view is 7.5 tokens tall, the 100-px view 18.75: both valid grids overhang the scene
    strategy = UhrBatStrategy(PruningConfig(strategy="uhr-bat", budget=64, scales=[40, 100], uhr_bat={"regions": 4}))
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image_factory(150, 200)))
    anchor, fine = encoding.scales
    assert (anchor.rows, fine.rows) == (8, 19)
    anchor_map = torch.rand(anchor.rows, anchor.cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    aligned = align_importance(anchor_map, (fine.rows, fine.cols), token_step(anchor.grid, fine.grid))
    # Independently: each fine token's scene-pixel centre in anchor-token units, sampled bilinearly (edges clamped).
    centres = fine.grid.token_boxes()[: fine.rows, : fine.cols].double()
    cell = anchor.grid.token_boxes()[0, 0].double()
    x = ((centres[..., 0] + centres[..., 2]) / 2) / (cell[2] - cell[0]) - 0.5
    y = ((centres[..., 1] + centres[..., 3]) / 2) / (cell[3] - cell[1]) - 0.5
    where = torch.stack([x / (anchor.cols - 1) * 2 - 1, y / (anchor.rows - 1) * 2 - 1], dim=-1)
    expected = F.grid_sample(anchor_map[None, None], where[None], mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    torch.testing.assert_close(aligned, expected, rtol=1e-9, atol=1e-12)


# -- region partition ----------------------------------------------------------------------------


def _two_blob_features(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols, 4) features: one direction on the left half of the grid, another on the right."""
    generator = torch.Generator().manual_seed(0)
    left = torch.arange(cols).expand(rows, cols) < cols // 2
    directions = torch.where(left[..., None], torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 1.0, 0]))
    return directions * 5 + 0.05 * torch.randn(rows, cols, 4, generator=generator)


def test_clustering_embedding_normalises_features_and_scales_coordinates():
    embedding = clustering_embedding(_two_blob_features(3, 4), coord_weight=2.0)
    assert embedding.shape == (12, 6) and embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embedding[:, :4], axis=1), 1.0, rtol=1e-6)
    # Token 5 is row 1, col 1 of 4 columns: centre (1.5, 1.5) over the longest side, 4.
    np.testing.assert_allclose(embedding[5, 4:], [2.0 * 1.5 / 4, 2.0 * 1.5 / 4])
    # Token 11 is row 2, col 3: x before y.
    np.testing.assert_allclose(embedding[11, 4:], [2.0 * 3.5 / 4, 2.0 * 2.5 / 4])


@pytest.mark.parametrize(
    "config",
    [
        UhrBatConfig(regions=2),
        UhrBatConfig(regions=2, minibatch_above=10, minibatch_size=64),
        UhrBatConfig(regions=2, partition=PartitionMethod.BIRCH),
    ],
    ids=["kmeans", "minibatch", "birch"],
)
def test_partition_separates_two_kinds_of_ground(config):
    features = _two_blob_features(6, 8)
    regions = partition_regions(clustering_embedding(features, 0.1), config)
    left = (torch.arange(8).repeat(6) < 4).numpy()
    assert sorted(np.unique(regions).tolist()) == [0, 1]
    assert len(np.unique(regions[left])) == 1 and len(np.unique(regions[~left])) == 1
    again = partition_regions(clustering_embedding(features, 0.1), config)
    np.testing.assert_array_equal(regions, again)


def test_partition_of_few_or_identical_tokens():
    config = UhrBatConfig(regions=8)
    assert partition_regions(np.zeros((5, 3), dtype=np.float32), config).tolist() == [0, 1, 2, 3, 4]
    flat = partition_regions(np.zeros((40, 3), dtype=np.float32), config)
    assert flat.tolist() == [0] * 40  # one distinct point: empty clusters are dropped


# -- preserve-and-merge --------------------------------------------------------------------------


@st.composite
def scale_case(draw):
    count = draw(st.integers(1, 60))
    num_regions = draw(st.integers(1, count))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    regions = torch.cat([torch.arange(num_regions), torch.randint(0, num_regions, (count - num_regions,), generator=generator)])
    regions = regions[torch.randperm(count, generator=generator)]
    importance = torch.rand(count, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):  # plateaus: equal scores inside and across regions
        importance = (importance * 3).floor()
    embeds = torch.randn(count, 5, generator=generator, dtype=torch.float64)
    budget = draw(st.integers(0, count + num_regions + 2))
    return embeds, importance, regions, budget


@settings(max_examples=150, deadline=None)
@given(scale_case())
def test_preserve_and_merge_invariants(case):
    embeds, importance, regions, budget = case
    selection = preserve_and_merge(embeds, importance, regions, budget)
    outputs = selection.embeds.shape[0]
    num_regions = int(regions.max()) + 1
    mean = torch.stack([importance[regions == m].mean() for m in range(num_regions)])
    torch.testing.assert_close(selection.region_mean, mean)

    # hard budget
    assert outputs <= budget

    # every region that fits the budget (by priority) keeps at least one token, its top one
    priority = torch.sort(mean, descending=True, stable=True).indices
    for m in priority[: min(num_regions, budget)].tolist():
        assert bool((selection.region[~selection.merged] == m).any())

    # each output is the exact mean of the tokens assigned to it; merged ones only hold tokens below the mean
    for out in range(outputs):
        members = selection.assignment == out
        torch.testing.assert_close(selection.embeds[out], embeds[members].mean(0), rtol=1e-12, atol=1e-12)
        m = int(selection.region[out])
        assert bool((regions[members] == m).all())
        if selection.merged[out]:
            assert bool((importance[members] < mean[m]).all())
        else:
            assert int(members.sum()) == 1 and float(importance[members][0]) >= float(mean[m]) - 1e-12

    # regions in descending mean importance, contiguous; kept tokens by descending importance, merged last
    order = selection.region.tolist()
    blocks = [m for i, m in enumerate(order) if i == 0 or order[i - 1] != m]
    assert len(blocks) == len(set(blocks))
    assert all(mean[a] >= mean[b] for a, b in zip(blocks, blocks[1:]))
    for m in blocks:
        rows = [i for i, r in enumerate(order) if r == m]
        kept = [i for i in rows if not selection.merged[i]]
        merged = [i for i in rows if selection.merged[i]]
        assert rows == kept + merged and len(merged) <= 1
        scores = [float(importance[selection.assignment == i][0]) for i in kept]
        assert scores == sorted(scores, reverse=True)

    # with room for every candidate nothing is cut: every token is in exactly one output
    if budget >= int((importance.double() >= mean[regions] - 1e-12).sum()) + num_regions:
        assert bool((selection.assignment >= 0).all())


@settings(max_examples=150, deadline=None)
@given(scale_case())
def test_plain_cut_keeps_the_first_candidates_as_algorithm_1_writes_it(case):
    embeds, importance, regions, budget = case
    uncut = preserve_and_merge(embeds, importance, regions, budget=embeds.shape[0] + int(regions.max()) + 1)
    cut = preserve_and_merge(embeds, importance, regions, budget, reserve_regions=False)
    assert cut.embeds.shape[0] == min(budget, uncut.embeds.shape[0])
    torch.testing.assert_close(cut.region, uncut.region[:budget])
    torch.testing.assert_close(cut.merged, uncut.merged[:budget])
    torch.testing.assert_close(cut.embeds, uncut.embeds[:budget], rtol=1e-12, atol=1e-12)
    # a token is in the output it had uncut, or in none when the cut dropped that output
    torch.testing.assert_close(cut.assignment, torch.where(uncut.assignment < budget, uncut.assignment, -1))


def test_plain_cut_can_leave_regions_out_that_the_reserving_cut_keeps():
    # Three regions of two tokens; region 0 the most important. Budget 2: the plain cut spends it on
    # region 0's kept token and merged token, the reserving cut on the top tokens of regions 0 and 1.
    importance = torch.tensor([0.9, 0.3, 0.5, 0.4, 0.2, 0.1], dtype=torch.float64)  # region means 0.6, 0.45, 0.15
    regions = torch.tensor([0, 0, 1, 1, 2, 2])
    embeds = torch.arange(6, dtype=torch.float64)[:, None]
    plain = preserve_and_merge(embeds, importance, regions, 2, reserve_regions=False)
    assert plain.region.tolist() == [0, 0] and plain.merged.tolist() == [False, True]
    reserving = preserve_and_merge(embeds, importance, regions, 2)
    assert reserving.region.tolist() == [0, 1] and reserving.merged.tolist() == [False, False]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=0, max_size=3),
    st.integers(1, 30),
    st.integers(1, 200),
    st.integers(0, 2**31 - 1),
)
def test_multi_scale_selection_respects_every_budget(h1, w1, finer, regions, budget, seed):
    """Alignment + partition + allocation + preserve-and-merge over random grids and scales."""
    generator = torch.Generator().manual_seed(seed)
    grids = [(h1, w1)] + sorted((max(h, h1), max(w, w1)) for h, w in finer)
    anchor = torch.rand(h1, w1, generator=generator)
    labels = []
    for h, w in grids:
        count = h * w
        k = min(regions, count)
        labels.append(torch.cat([torch.arange(k), torch.randint(0, k, (count - k,), generator=generator)]))
    budgets = allocate_budgets(budget, [h * w for h, w in grids], [int(label.max()) + 1 for label in labels])
    total = 0
    for (h, w), label, scale_budget in zip(grids, labels, budgets):
        importance = align_importance(anchor, (h, w)).reshape(-1)
        selection = preserve_and_merge(torch.randn(h * w, 3, generator=generator), importance, label, scale_budget)
        assert selection.embeds.shape[0] <= scale_budget
        total += selection.embeds.shape[0]
    assert total <= budget


# -- the strategy on the tiny model ---------------------------------------------------------------


def _strategy(budget: int, **uhr_bat) -> UhrBatStrategy:
    config = PruningConfig(strategy="uhr-bat", budget=budget, scales=[40, 80, 120], uhr_bat={"regions": 4, **uhr_bat})
    return UhrBatStrategy(config)


@pytest.mark.parametrize("layer", [0, 1])  # the tiny LM has 2 layers: 1 is the default (middle), 0 is not
def test_importance_is_question_and_head_averaged_attention_at_the_configured_layer(tiny_model, image_factory, layer):
    model, _ = tiny_model
    question = "Is there a red boat moored beside the port?"
    strategy = _strategy(budget=64, importance_layer=layer)
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image_factory(60, 90)))
        importance = strategy.anchor_importance(model, encoding, question).reshape(-1)
        # eager forward with output_attentions on the same prompt
        anchor = encoding.scales[0].embeds
        ids, (position,), question_tokens = model._prompt(question)
        embeds = model.get_input_embeddings()(torch.tensor(ids))
        inputs = torch.cat([embeds[:position], anchor, embeds[position + 1 :]])[None]
        model.language_model.config._attn_implementation = "eager"
        attentions = model.language_model(inputs_embeds=inputs, output_attentions=True).attentions  # per layer (1, H, L, L)
    count = anchor.shape[0]
    rows = torch.tensor([t + count - 1 if t > position else t for t in question_tokens])
    by_layer = [a[0].mean(0)[rows][:, position : position + count].mean(0).float() for a in attentions]
    torch.testing.assert_close(importance, by_layer[layer], rtol=1e-4, atol=1e-6)
    # the layers' maps differ by more than ten times that tolerance (the tiny LM attends almost uniformly)
    assert not torch.allclose(by_layer[0], by_layer[1], rtol=1e-3, atol=1e-6)


def test_select_respects_budgets_and_counts_every_token(tiny_model, image_factory):
    model, _ = tiny_model
    image = image_factory(70, 100)
    strategy = _strategy(budget=10_000)
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image))
        tokens = strategy.select(model, encoding, "How many ships?")
    assert isinstance(encoding, UhrBatEncoding)
    assert [s.view.side for s in encoding.scales] == [40, 80, 100]  # 120 clamped to the scene's 100
    assert tokens.dense == encoding.dense == sum(s.rows * s.cols for s in encoding.scales)
    # the budget is ample: every valid token of every scale is represented exactly once
    for scale in encoding.scales:
        assert int(tokens.n_source[tokens.scale == scale.view.index].sum()) == scale.rows * scale.cols
    # scales coarse to fine
    assert bool((tokens.scale[1:] >= tokens.scale[:-1]).all())

    tight = _strategy(budget=9)
    with torch.no_grad():
        encoding = tight.encode(model, ArraySource(image))
        tokens = tight.select(model, encoding, "How many ships?")
    assert len(tokens) <= 9
    for scale in encoding.scales:
        assert int((tokens.scale == scale.view.index).sum()) <= scale.budget


def test_select_cuts_plainly_when_reserve_regions_is_off(tiny_model, image_factory):
    model, _ = tiny_model
    question = "How many ships?"
    # 3 scales of 4 regions under a budget of 12: each scale gets B_s = R_s = 4, one slot per region
    reserving, plain = _strategy(budget=12), _strategy(budget=12, reserve_regions=False)
    with torch.no_grad():
        encoding = reserving.encode(model, ArraySource(image_factory(70, 100)))
        tokens = {flag: strategy.select(model, encoding, question) for flag, strategy in [(True, reserving), (False, plain)]}
        anchor_map = reserving.anchor_importance(model, encoding, question)
    assert [s.budget for s in encoding.scales] == [int(s.regions.max()) + 1 for s in encoding.scales] == [4, 4, 4]
    for flag in (True, False):
        # what preserve-and-merge gives each scale with that flag, scale after scale
        expected = []
        for scale in encoding.scales:
            aligned = align_importance(anchor_map, (scale.rows, scale.cols), token_step(encoding.scales[0].grid, scale.grid))
            expected.append(preserve_and_merge(scale.embeds, aligned.reshape(-1), scale.regions, scale.budget, flag))
        torch.testing.assert_close(tokens[flag].embeds, torch.cat([s.embeds for s in expected]))
        regions_kept = [len(torch.unique(s.region)) for s in expected]
        # the reserving cut keeps a token of every region; the plain one lets the first regions take the budget
        assert (min(regions_kept) == 4) if flag else (min(regions_kept) < 4)
    assert not torch.equal(tokens[True].embeds, tokens[False].embeds)


def test_given_scale_budgets_of_merged_scales_add_up(tiny_model, image_factory):
    model, _ = tiny_model
    strategy = UhrBatStrategy(
        PruningConfig(strategy="uhr-bat", budget=30, scales=[40, 80, 120], scale_budgets=[5, 10, 15], uhr_bat={"regions": 3})
    )
    with torch.no_grad():
        encoding = strategy.encode(model, ArraySource(image_factory(50, 60)))
    assert [(s.view.side, s.budget) for s in encoding.scales] == [(40, 5), (60, 25)]
