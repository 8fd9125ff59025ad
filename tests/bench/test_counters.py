"""WorkCounter counts exactly what each strategy asks of the model, without changing its output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhr.bench.counters import WorkCounter
from uhr.bench.inputs import build_bench_model
from uhr.model.pruning import PruningConfig, build_strategy
from uhr.scenes import ArraySource

QUESTIONS = ["How many ships are in the harbour?", "Is the road flooded after the storm?"]


@pytest.fixture(scope="module")
def model():
    return build_bench_model()[0]


@pytest.fixture(scope="module")
def source():
    """A 1344-px scene: 4 x 4 tiles of 336 px at full resolution."""
    rng = np.random.default_rng(0)
    return ArraySource(rng.integers(0, 256, (1344, 1344, 3), dtype=np.uint8))


def run(model, source, pruning, counter=None):
    strategy = build_strategy(pruning)
    with torch.inference_mode():
        if counter is None:
            encoding = strategy.encode(model, source)
            return [strategy.select(model, encoding, q) for q in QUESTIONS]
        with counter.phase("encode"):
            encoding = strategy.encode(model, source)
        with counter.phase("select"):
            return [strategy.select(model, encoding, q) for q in QUESTIONS]


def test_uhr_bat_counts_tiles_projected_tokens_one_anchor_pass_and_each_question(model, source):
    pruning = PruningConfig(strategy="uhr-bat", budget=256, scales=[336, 672, 1344], uhr_bat={"regions": 8})
    with WorkCounter(model) as counter:
        tokens = run(model, source, pruning, counter)
    encode, select = counter.phases["encode"], counter.phases["select"]
    assert encode.tiles == 1 + 4 + 16 and select.tiles == 0
    assert encode.projected == 24**2 + 48**2 + 96**2 == tokens[0].dense
    # The LM runs over the anchor scale (one tile, 24 x 24 tokens) once, then each question's text over it.
    assert select.importance == [24**2] and encode.importance == []
    assert select.importance_questions == [24**2] * len(QUESTIONS)


def test_c2f_counts_the_thumbnail_and_base_level_then_the_tiles_each_question_zooms_into(model, source):
    # Budget 2048: the thumbnail's 576 tokens leave room to zoom from the 672-px base into 1344-px tiles.
    pruning = PruningConfig(strategy="c2f", budget=2048, c2f={"base_side": 672})
    with WorkCounter(model) as counter:
        run(model, source, pruning, counter)
    encode, select = counter.phases["encode"], counter.phases["select"]
    assert encode.tiles == 1 + 4  # thumbnail, 2 x 2 base tiles
    # Per question: the base level scored, then the 1344-px level's candidate tiles; each pass holds the
    # thumbnail's 576 tokens of context and 12 x 12 pooled tokens per tile. The LM runs over the base
    # level once for all questions, over each question's candidate tiles once for that question.
    base = 24**2 + 4 * 12**2
    assert select.importance[0] == base and len(select.importance) == 1 + len(QUESTIONS)
    assert select.importance_questions[0::2] == [base] * len(QUESTIONS)
    assert select.importance_questions[1::2] == select.importance[1:]
    assert all((visual - 24**2) % 12**2 == 0 for visual in select.importance)
    # Fine tiles are encoded once (later questions reuse cached ones), never more than the level has.
    zoomed = [(visual - 24**2) // 12**2 for visual in select.importance[1:]]
    assert max(zoomed) <= select.tiles <= min(sum(zoomed), 16)


def test_counting_changes_nothing_and_hooks_go_away(model, source):
    pruning = PruningConfig(strategy="uhr-bat", budget=128, scales=[336, 672], uhr_bat={"regions": 8})
    plain = run(model, source, pruning)
    with WorkCounter(model) as counter:
        counted = run(model, source, pruning, counter)
    assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(plain, counted))
    before = dict(counter.phases)
    run(model, source, pruning)
    assert counter.phases == before
    with pytest.raises(RuntimeError, match="inside phase"):
        with WorkCounter(model) as nested, nested.phase("a"), nested.phase("b"):
            pass
