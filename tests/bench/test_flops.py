"""The FLOP model against torch's own count on the benchmark model, and how it prices a workload."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from uhr.bench.flops import (
    H100,
    Utilisation,
    Workload,
    importance_flops,
    lm_prefill_flops,
    price,
    real_model_config,
    vision_tile_flops,
)
from uhr.bench.inputs import build_bench_model
from uhr.model.importance import decoder_attention, decoder_prefix


@pytest.fixture(scope="module")
def eager_model():
    """The benchmark model with eager attention, whose matrix products FlopCounterMode sees."""
    model, _ = build_bench_model()
    model.set_attn_implementation("eager")
    return model


def counted(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_tile_flops_equal_torch_count_on_the_real_tile_geometry(eager_model):
    tiles = torch.zeros(3, 336, 336, 3, dtype=torch.uint8)
    assert counted(lambda: eager_model.encode_tiles(tiles)) == 3 * vision_tile_flops(eager_model.config)


@pytest.mark.parametrize("positions", [1, 97, 640])
def test_prefill_flops_equal_torch_count(eager_model, positions):
    text = eager_model.config.text_config
    embeds = torch.randn(1, positions, text.hidden_size)
    lm_head = 2 * text.hidden_size * text.vocab_size  # logits of the last position only
    assert counted(lambda: eager_model.language_model(inputs_embeds=embeds, logits_to_keep=1)) == (
        lm_prefill_flops(text, positions) + lm_head
    )


def test_importance_flops_are_the_layers_below_plus_query_key_projections(eager_model):
    text = eager_model.config.text_config
    positions, layer = 300, 1
    queries, keys = torch.arange(290, 300), torch.arange(10, 250)
    embeds = torch.randn(1, positions, text.hidden_size)
    total = counted(lambda: decoder_attention(eager_model.language_model, embeds, layer, queries, keys))
    # The formula leaves out the scores of the few query rows: 2 * heads * head_dim * positions per query.
    scores = 2 * text.hidden_size * positions * len(queries)
    assert total == importance_flops(eager_model.config, positions, layer) + scores


def test_a_prefix_and_a_question_over_it_are_priced_like_their_passes(eager_model):
    text = eager_model.config.text_config
    head, tail, layer = 250, 50, 1
    prefix_embeds, tail_embeds = torch.randn(1, head, text.hidden_size), torch.randn(1, tail, text.hidden_size)
    queries, keys = torch.arange(290, 300), torch.arange(10, 250)
    prefix = decoder_prefix(eager_model.language_model, prefix_embeds, layer)
    assert counted(lambda: decoder_prefix(eager_model.language_model, prefix_embeds, layer)) == importance_flops(
        eager_model.config, head, layer
    )
    total = counted(lambda: decoder_attention(eager_model.language_model, tail_embeds, layer, queries, keys, prefix))
    scores = 2 * text.hidden_size * (head + tail) * len(queries)
    assert total == importance_flops(eager_model.config, tail, layer, past=head) + scores


def test_real_sizes_match_published_dimensions():
    config = real_model_config()
    # CLIP ViT-L/14-336 to the penultimate layer: ~0.37 TFLOPs a tile (2 x 0.3B params x 577 tokens + attention).
    assert 3.6e11 < vision_tile_flops(config) < 3.7e11
    # Qwen2-7B prefill: ~2 x 6.5B non-embedding params per token, plus attention.
    assert 13.0e9 < lm_prefill_flops(config.text_config, 1) < 13.2e9


workloads = st.builds(
    Workload,
    tiles=st.integers(0, 300),
    projected=st.integers(0, 200_000),
    importance=st.lists(st.integers(1, 5000), max_size=3),
    importance_questions=st.lists(st.integers(1, 5000), max_size=3),
    answers=st.lists(st.integers(1, 5000), max_size=4),
)


@settings(max_examples=25, deadline=None)
@given(workloads, workloads)
def test_flops_add_up_over_workloads(a, b):
    config, utilisation = real_model_config(), Utilisation()

    def flops(workload: Workload) -> float:
        return price(workload, config, H100, utilisation, prompt_tokens=100, answer_tokens=4).flops

    assert flops(a + b) == pytest.approx(flops(a) + flops(b), rel=1e-12)


def test_batching_decode_and_sharing_the_visual_prefix_save_time_not_work():
    config, utilisation = real_model_config(), Utilisation()
    workload = Workload(answers=[2000] * 8)

    def cost(**options):
        return price(workload, config, H100, utilisation, prompt_tokens=100, answer_tokens=8, **options)

    alone, batched = cost(), cost(answer_batch=8)
    shared, thumbnail = cost(answer_batch=8, shared_visual=2000), cost(answer_batch=8, shared_visual=576)
    assert batched.flops == alone.flops and batched.decode_s < alone.decode_s / 4
    # The 2,000 visual positions are prefilled once instead of eight times.
    assert shared.prefill < batched.prefill / 4 and shared.decode == batched.decode
    # A shared thumbnail saves its own positions' prefill, not the questions' own tokens'.
    assert shared.prefill < thumbnail.prefill < batched.prefill and thumbnail.decode == batched.decode
    with pytest.raises(ValueError, match="fewest any answer has"):
        price(
            Workload(answers=[10, 20]), config, H100, utilisation, prompt_tokens=1, answer_tokens=1, shared_visual=11
        )
