"""What `python -m jobs.vqa` uses when given nothing: a small synthetic archive and the default model.

The archive is made once in the uhr cache directory (`uhr.cache.default_cache_dir()`) and reused;
the default model is the demo model shipped with the package (`uhr.demo`, trained by
`jobs.finetune` on synthetic 1024-px scenes).
"""

from __future__ import annotations

from pathlib import Path

from uhr.cache import default_cache_dir
from uhr.synth import ArchiveIndex, cached_archive

# Like the demo model's benchmark (`uhr.demo.TEST`), of another seed: scenes of the size it was
# trained on and questions of the kind it learnt, so `make run` reports a meaningful accuracy.
SAMPLE_SCENES = 4
SAMPLE_SIZE = 1024
SAMPLE_SEED = 7
SAMPLE_QUESTIONS = {"questions_per_scene": 12, "open_fraction": 0.0, "referents": "scene", "option_order": "fixed"}
# Shipped package data; see uhr/demo.py for how it is made.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
# Pruning settings for the random tiny models of the tests (`build_tiny_model`): their 32-px tiles
# stand in for CLIP's 336 px, so these are the same tile counts as the papers' settings.
TINY_PRUNING_DEFAULTS = {
    "strategy": "uhr-bat",
    "budget": 256,
    "scales": [64, 128, 256, 384],
    "c2f": {"base_side": 96},
    "uhr_bat": {"regions": 16},
}


def sample_archive() -> ArchiveIndex:
    """The embedded sample: `SAMPLE_SCENES` synthetic scenes of `SAMPLE_SIZE` px with multiple-choice questions."""
    root = default_cache_dir() / "sample" / f"archive-{SAMPLE_SCENES}x{SAMPLE_SIZE}-seed{SAMPLE_SEED}-scene-fixed"
    return cached_archive(root, scenes=SAMPLE_SCENES, size=SAMPLE_SIZE, seed=SAMPLE_SEED, split="test", **SAMPLE_QUESTIONS)


def default_model() -> str:
    """Path of the default model: the shipped demo model (its pruning defaults travel in its config)."""
    if not (DEMO_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"the demo model is missing from the installed package: no config.json in {DEMO_MODEL_DIR}")
    return str(DEMO_MODEL_DIR)
