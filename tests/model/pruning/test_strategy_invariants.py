"""Invariants every pruning strategy keeps: the hard budget, provenance, gradients in the loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.model.conftest import textured_image
from uhr.model import IGNORE_INDEX, build_tiny_model, tokenize_conversation
from uhr.model.pruning import STRATEGIES, PrunedTokens, StrategyName, build_strategy
from uhr.model.pruning.config import PruningConfig
from uhr.scenes.source import ArraySource

MINE = ["downsample", "geollava", "uhr-bat", "c2f"]
# Small multi-scale / pyramid settings for 32-px tiles; the defaults target 336-px tiles.
SETTINGS = {
    "downsample": {},
    "geollava": {"geollava": {"max_tokens_per_tile": 6, "max_tiles_per_side": 4, "max_tiles": 12}},
    "uhr-bat": {"scales": [40, 80, 160], "uhr_bat": {"regions": 6}},
    "c2f": {"c2f": {"base_side": 64}},
}
_MODEL = build_tiny_model(seed=0)[0]  # read-only here; the training test builds its own


def _config(name: str, budget: int, **extra) -> PruningConfig:
    return PruningConfig(strategy=name, budget=budget, **{**SETTINGS[name], **extra})


def _check_provenance(tokens: PrunedTokens) -> None:
    count = len(tokens)
    for field in (tokens.scale, tokens.row, tokens.col, tokens.tile, tokens.n_source):
        assert field.shape == (count,) and field.dtype == torch.long
    assert tokens.box.shape == (count, 4)
    assert bool((tokens.n_source >= 0).all()) and bool((tokens.row >= 0).all()) and bool((tokens.col >= 0).all())
    assert bool((tokens.box[:, 2] >= tokens.box[:, 0]).all()) and bool((tokens.box[:, 3] >= tokens.box[:, 1]).all())
    assert int(tokens.n_source.sum()) <= tokens.dense


def test_registry_covers_every_strategy_name():
    assert set(STRATEGIES) == set(StrategyName)
    for name in StrategyName:
        strategy = build_strategy(PruningConfig(strategy=name))
        assert type(strategy) is STRATEGIES[name] and strategy.name == name.value


@pytest.mark.parametrize("name", MINE)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1, 260), width=st.integers(1, 260), budget=st.integers(1, 3000), seed=st.integers(0, 3))
def test_hard_budget_and_provenance(name, height, width, budget, seed):
    strategy = build_strategy(_config(name, budget))
    source = ArraySource(textured_image(height, width, seed=seed))
    with torch.no_grad():
        encoding = strategy.encode(_MODEL, source)
        tokens = strategy.select(_MODEL, encoding, "How many ships are in the harbour?")
    assert len(tokens) <= budget
    assert tokens.embeds.shape == (len(tokens), _MODEL.config.text_config.hidden_size)
    assert bool(torch.isfinite(tokens.embeds).all())
    _check_provenance(tokens)
    grid = _MODEL.patch_grid
    if name == "downsample":
        assert int(tokens.n_source.sum()) == tokens.dense  # pooling windows partition the view
    elif name == "c2f":
        pool = strategy.config.c2f.pool
        glob = tokens.scale == 0
        assert int(tokens.n_source[glob].sum()) == (grid * grid if glob.any() else 0)
        assert bool((tokens.n_source[~glob] == pool * pool).all())


@pytest.mark.parametrize("name", ["geollava", "uhr-bat"])
def test_with_room_for_everything_every_token_is_accounted_for(name):
    extra = {"geollava": {"max_tokens_per_tile": 64, "max_tiles_per_side": 4, "max_tiles": 12}} if name == "geollava" else {}
    strategy = build_strategy(_config(name, 100_000, **extra))
    with torch.no_grad():
        encoding = strategy.encode(_MODEL, ArraySource(textured_image(70, 110)))
        tokens = strategy.select(_MODEL, encoding, "Is the road flooded?")
    # every cluster (geollava keeps all 64 slots) or every kept/merged token (uhr-bat) is emitted
    assert int(tokens.n_source.sum()) == tokens.dense == encoding.dense


def _batch(tokenizer, samples):
    rows = [tokenize_conversation(tokenizer, conversation, 256) for conversation in samples]
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = row["input_ids"], row["labels"], 1
    return input_ids, mask, labels


QUESTIONS = ["How many ships are in the harbour?", "Is the road flooded after the storm?"]
ANSWERS = ["three", "no"]


@pytest.mark.parametrize("name", ["uhr-bat", "c2f"])
def test_questions_sharing_an_encoding_select_what_each_selects_alone(name):
    """The query-guided strategies score with an LM pass over the scene's tokens that the first
    question makes and later ones reuse: it must not change what any question selects."""
    strategy = build_strategy(_config(name, 200))
    source = ArraySource(textured_image(150, 210, seed=1))
    questions = ["How many ships are in the harbour?", "Is there a red roof?", "Where is the bridge, left or right?"]
    with torch.no_grad():
        shared = strategy.encode(_MODEL, source)
        together = [strategy.select(_MODEL, shared, q) for q in questions]
        alone = [strategy.select(_MODEL, strategy.encode(_MODEL, source), q) for q in questions]
    for a, b in zip(together, alone):
        for field in ("scale", "row", "col", "tile", "n_source"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        torch.testing.assert_close(a.embeds, b.embeds)
    assert any(not torch.equal(together[0].row, t.row) for t in together[1:])  # the questions do choose


@pytest.mark.parametrize("name", MINE)
def test_loss_decreases_with_pruning_in_the_loop(name, tiny_model):
    model, tokenizer = tiny_model
    model.train()
    strategy = build_strategy(_config(name, 96, **({"scales": [32, 64]} if name == "uhr-bat" else {})))
    sources = [ArraySource(textured_image(60, 80, seed=0)), ArraySource(textured_image(90, 50, seed=1))]
    conversations = [
        [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}] for q, a in zip(QUESTIONS, ANSWERS)
    ]
    input_ids, mask, labels = _batch(tokenizer, conversations)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(5):
        visual = [strategy.select(model, strategy.encode(model, s), q) for s, q in zip(sources, QUESTIONS)]
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, visual=visual)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            # selection is discrete, but the kept and merged features carry gradients to the projector and tower
            params = dict(model.named_parameters())
            for param in ("multi_modal_projector.linear_1.weight", "vision_tower.embeddings.patch_embedding.weight"):
                grad = params[param].grad
                assert grad is not None and float(grad.abs().sum()) > 0, param
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.85 * losses[0], losses
