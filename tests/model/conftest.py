"""Tiny-model fixtures shared by the model and pruning tests (names are stable: other suites use them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhr.model import UhrForConditionalGeneration, build_tiny_model
from uhr.model.pruning.base import PrunedTokens


@pytest.fixture
def tiny_model() -> tuple[UhrForConditionalGeneration, object]:
    """(model, tokenizer): tiny Qwen2-based model, seed 0, 32-px tiles of 8 x 8 tokens, LM width 64."""
    return build_tiny_model(seed=0, text_model="qwen2")


@pytest.fixture
def tiny_llama_model() -> tuple[UhrForConditionalGeneration, object]:
    """(model, tokenizer): the same tiny model with a Llama LM."""
    return build_tiny_model(seed=0, text_model="llama")


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 with smooth structure plus noise, so resizing and tiling matter."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack(
        [127 + 100 * np.sin(xs / 7.0), 127 + 100 * np.cos(ys / 5.0), 127 + 80 * np.sin((xs + ys) / 11.0)], axis=-1
    )
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def image_factory():
    """`image_factory(height, width, seed=0)` -> a deterministic textured (H, W, 3) uint8 image."""
    return textured_image


def random_tokens(count: int, dim: int, seed: int = 0) -> PrunedTokens:
    """`count` random LM-space visual tokens with trivial provenance (for tests of the LM side)."""
    generator = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(count, dtype=torch.long)
    return PrunedTokens(
        embeds=torch.randn(count, dim, generator=generator),
        scale=zeros,
        row=zeros,
        col=torch.arange(count),
        tile=zeros,
        n_source=torch.ones(count, dtype=torch.long),
        box=torch.zeros(count, 4),
        dense=count,
    )


@pytest.fixture
def tokens_factory():
    """`tokens_factory(count, dim, seed=0)` -> `PrunedTokens` with random embeddings."""
    return random_tokens


@pytest.fixture
def config_geometry():
    """What a driver plans reads with, from a config: tile, patch grid, pinpoints, widths, pruning defaults."""

    def geometry(config) -> tuple:
        return (
            config.tile_size,
            config.patch_grid,
            config.image_grid_pinpoints,
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
            config.pruning_defaults,
        )

    return geometry
