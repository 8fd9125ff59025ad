"""The export task's memory reservation, from the model's config alone."""

from __future__ import annotations

from uhr.bench.flops import real_model_config
from uhr.model import build_tiny_model
from uhr.train.export import export_memory_bytes


def test_export_reserves_three_float32_copies_of_the_model():
    model, _ = build_tiny_model(seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    assert export_memory_bytes(model.config) == 12 * parameters + (2 << 30)
    # CLIP ViT-L/14-336 + Qwen2-7B: 7.9 B parameters, ~97 GB; more than a 64-GiB CPU node has.
    assert 95e9 < export_memory_bytes(real_model_config()) < 100e9
