"""What the model and VQA benchmarks run on: a tiny model with CLIP's real tile geometry, cached
synthetic scenes and their questions.

The model is `build_tiny_model` with a tower that cuts 336-px tiles into 14-px patches (24 x 24
tokens per tile, as CLIP ViT-L/14-336) and LLaVA-NeXT's default anyres grids, but tiny widths: the
token counts, tiles read and bytes read of every strategy are the production ones while the compute
stays small enough for a CPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from uhr.cache import default_cache_dir
from uhr.model import UhrForConditionalGeneration, build_tiny_model, save_model
from uhr.model.config import LLAVA_NEXT_PINPOINTS, UhrConfig
from uhr.model.pruning import PruningConfig, StrategyName
from uhr.model.pruning.none import anyres_token_count
from uhr.scenes.benchmark import ReadBenchConfig, scene_path
from uhr.synth import Question, generate_questions, plan_scene

REAL_TILE_GEOMETRY = {"image_size": 336, "patch_size": 14}
"""CLIP ViT-L/14-336's tile: 336-px input, 14-px patches (24 x 24 tokens)."""


def bench_cache_dir() -> Path:
    """Where benchmark scenes and models are kept between runs (shared with `jobs.bench_read`)."""
    return default_cache_dir() / "bench"


def build_bench_model(seed: int = 0) -> tuple[UhrForConditionalGeneration, PreTrainedTokenizerBase]:
    """The tiny model with the real tile geometry and LLaVA-NeXT's default grids, in eval mode."""
    return build_tiny_model(
        seed=seed,
        vision_config=dict(REAL_TILE_GEOMETRY),
        image_grid_pinpoints=[list(pinpoint) for pinpoint in LLAVA_NEXT_PINPOINTS],
    )


def saved_bench_model(cache_dir: Path, seed: int = 0) -> Path:
    """`build_bench_model(seed)` saved in our export format under `cache_dir` (once), for the VQA job."""
    path = cache_dir / "models" / f"tiny-tile336-patch14-seed{seed}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model, _ = build_bench_model(seed)
    # Staged and renamed into place: a concurrent run never loads a half-written model.
    staging = tempfile.mkdtemp(dir=path.parent, prefix=".staging-")
    try:
        save_model(model, staging)
        os.rename(staging, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def strategy_config(strategy: StrategyName | str, model_config: UhrConfig, width: int, height: int) -> PruningConfig:
    """The default `PruningConfig` for `strategy`; `none` gets the budget the model's anyres grids need.

    `none` keeps every token of LLaVA-NeXT's tiling, so the default budget (1024) would refuse all of
    LLaVA-NeXT's grids; it gets the largest grid's token count for this scene instead.
    """
    name = StrategyName(strategy)
    if name is not StrategyName.NONE:
        return PruningConfig(strategy=name)
    tile, grid = model_config.tile_size, model_config.patch_grid
    budget = max(
        anyres_token_count(width, height, tuple(pinpoint), tile, grid) for pinpoint in model_config.image_grid_pinpoints
    )
    return PruningConfig(strategy=name, budget=budget)


def cached_scene(cache_dir: Path, size: int, seed: int) -> Path:
    """The synthetic JPEG COG of `size` px and `seed` (`uhr.synth.write_scene`), generated on first use.

    Same files as `jobs.bench_read` (`synth_<size>_seed<seed>_jpeg.tif`): a 32768^2 scene takes
    about ten minutes to write on two cores, so it is made once.
    """
    return scene_path(ReadBenchConfig(sizes=(size,), seed=seed, compress="jpeg", cache_dir=cache_dir), size)


def scene_questions(size: int, seed: int, count: int, scene: str) -> list[Question]:
    """`count` questions about the synthetic scene of `size` and `seed`, from its planned truth."""
    return generate_questions(plan_scene(size, seed), scene, count)


__all__ = [
    "REAL_TILE_GEOMETRY",
    "bench_cache_dir",
    "build_bench_model",
    "cached_scene",
    "saved_bench_model",
    "scene_questions",
    "strategy_config",
]
