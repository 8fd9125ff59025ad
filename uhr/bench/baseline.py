"""The naive baseline the VQA job is measured against: what a first script over an archive does.

Per scene: download the whole object, decode the whole image, resize it to one scale (`side`, 4032
px by default: UHR-BAT's finest scale, 12 x 12 tiles of 336 px), encode every tile with the same
model, average-pool the token grid only as much as the language model needs to fit (`context_budget`:
its context less room for the prompt and the answer), then answer the scene's questions one at a
time. No Ray, no overviews, no range reads, no batching; the scene's work is shared by its
questions, which is the most a script does without a cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from rasterio.io import MemoryFile

from uhr.model import UhrForConditionalGeneration
from uhr.model import tiling
from uhr.model.pruning.downsample import pool_to_budget
from uhr.scenes import fit_longest_side, resize_rgb
from uhr.storage import StorageConfig


@dataclass
class NaiveSceneTimes:
    """Wall seconds of each naive step for one scene, and what it downloaded."""

    download_s: float
    decode_s: float
    encode_s: float
    """Resize to `side`, every tile through the tower, pooling and projection."""
    answer_s: float
    """All the scene's questions, one generate call each."""
    object_bytes: int
    tiles: int
    tokens: int
    """Visual tokens each question was answered over."""

    @property
    def total_s(self) -> float:
        return self.download_s + self.decode_s + self.encode_s + self.answer_s


def context_budget(model: UhrForConditionalGeneration, text_reserve: int, max_new_tokens: int) -> int:
    """Visual tokens that fit the LM's context (`max_position_embeddings`) beside `text_reserve`
    prompt positions and the answer."""
    budget = model.config.text_config.max_position_embeddings - text_reserve - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"the LM's context leaves no room for visual tokens after {text_reserve + max_new_tokens} positions"
        )
    return budget


def naive_scene(
    model: UhrForConditionalGeneration,
    uri: str,
    prompts: list[str],
    storage: StorageConfig,
    *,
    side: int,
    budget: int,
    max_new_tokens: int,
) -> NaiveSceneTimes:
    """Run the naive baseline on one scene (see the module docstring); the answers are discarded."""
    start = time.perf_counter()
    data = storage.filesystem(uri).cat_file(uri)
    downloaded = time.perf_counter()
    with MemoryFile(data) as memory, memory.open() as dataset:
        bands = dataset.read(indexes=[1, 2, 3] if dataset.count >= 3 else [1, 1, 1])  # (3, H, W)
    image = np.ascontiguousarray(bands.transpose(1, 2, 0))
    decoded = time.perf_counter()
    height, width = image.shape[:2]
    view = resize_rgb(image, *fit_longest_side(width, height, side))
    del image, bands
    with torch.inference_mode():
        box = tiling.padded_box(width, height, view.shape[1], view.shape[0], model.tile_size)
        grid = model.encode_view(view, scale=0, box=box)
        tokens = pool_to_budget(model, grid, budget)
        encoded = time.perf_counter()
        for prompt in prompts:
            model.answer([tokens], [prompt], max_new_tokens=max_new_tokens)
    answered = time.perf_counter()
    rows, cols = grid.tiles
    return NaiveSceneTimes(
        download_s=downloaded - start,
        decode_s=decoded - downloaded,
        encode_s=encoded - decoded,
        answer_s=answered - encoded,
        object_bytes=len(data),
        tiles=rows * cols,
        tokens=len(tokens),
    )


__all__ = ["NaiveSceneTimes", "context_budget", "naive_scene"]
