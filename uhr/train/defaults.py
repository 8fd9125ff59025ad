"""What `python -m jobs.finetune` trains on when given no manifest: a synthetic training split.

Made once in the uhr cache directory (`uhr.cache.default_cache_dir()`) and reused, like the VQA
job's sample archive. Its scenes are drawn from the "train" split, so they never coincide with the
sample archive's "test" scenes.
"""

from __future__ import annotations

from uhr.cache import default_cache_dir
from uhr.synth import ArchiveIndex, cached_archive

TRAIN_SCENES = 8
TRAIN_SIZE = 1024
TRAIN_SEED = 7
TRAIN_QUESTIONS_PER_SCENE = 12


def training_archive() -> ArchiveIndex:
    """The embedded training split: `TRAIN_SCENES` synthetic scenes of `TRAIN_SIZE` px with conversations."""
    root = default_cache_dir() / "sample" / f"train-{TRAIN_SCENES}x{TRAIN_SIZE}-seed{TRAIN_SEED}"
    return cached_archive(
        root,
        scenes=TRAIN_SCENES,
        size=TRAIN_SIZE,
        seed=TRAIN_SEED,
        split="train",
        questions_per_scene=TRAIN_QUESTIONS_PER_SCENE,
    )
