"""The naive baseline reads the whole object from S3 and answers over at most the budget's tokens."""

from __future__ import annotations

import pytest
import torch

from uhr.bench.baseline import context_budget, naive_scene
from uhr.model.pruning.downsample import pool_to_budget
from uhr.bench.inputs import build_bench_model
from uhr.scenes import ArraySource
from uhr.synth import write_scene


@pytest.fixture(scope="module")
def model():
    return build_bench_model()[0]


@pytest.mark.parametrize(
    ("height", "width", "budget"), [(336, 336, 576), (336, 336, 100), (700, 1000, 1024), (1344, 672, 37)]
)
def test_pooling_keeps_every_valid_token_in_exactly_one_of_at_most_budget_tokens(model, height, width, budget):
    view = ArraySource(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy()).read_view(
        max(height, width)
    )
    with torch.inference_mode():
        grid = model.encode_view(view, scale=0, box=(0.0, 0.0, float(width), float(height)))
        tokens = pool_to_budget(model, grid, budget)
    valid = int(grid.valid.sum())
    assert len(tokens) <= budget and tokens.dense == valid
    assert int(tokens.n_source.sum()) == valid and bool((tokens.n_source >= 1).all())
    assert tokens.embeds.shape == (len(tokens), model.config.text_config.hidden_size)


def test_naive_scene_downloads_the_whole_object_and_encodes_every_tile(model, s3_server, tmp_path):
    bucket = s3_server.new_bucket("naive")
    path = tmp_path / "scene.tif"
    write_scene(str(path), 1024, seed=3, compress="jpeg")
    s3_server.client.upload_file(str(path), bucket, "scene.tif")
    prompts = ["How many ships are in the harbour?", "Is there a bridge over the river?"]
    with s3_server.measure() as sent:
        times = naive_scene(
            model, f"s3://{bucket}/scene.tif", prompts, s3_server.storage(), side=672, budget=256, max_new_tokens=2
        )
    assert times.object_bytes == path.stat().st_size <= sent.bytes_sent
    assert times.tiles == 4 and times.tokens == 256
    assert min(times.download_s, times.decode_s, times.encode_s, times.answer_s) > 0


def test_context_budget_leaves_room_for_the_prompt_and_answer(model):
    assert context_budget(model, text_reserve=512, max_new_tokens=8) == 4096 - 520
    with pytest.raises(ValueError, match="no room"):
        context_budget(model, text_reserve=4096, max_new_tokens=1)
