"""For tests that run DeepSpeed on one rank over gloo in a subprocess (a process group is
process-wide state, kept out of pytest's process): the run itself, and the tiny model and training
samples its script starts from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from uhr.model import build_tiny_model, load_model_config, save_model
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.defaults import TINY_PRUNING_DEFAULTS
from uhr.pipeline.vqa import resolve_pruning
from uhr.scenes.normalize import NormalizeConfig
from uhr.storage import StorageConfig
from uhr.synth import write_archive
from uhr.train.data import load_tokenizer, prepare_sample

PROJECT = Path(__file__).resolve().parents[2]


def run_one_rank(script: str, root: Path, port: int) -> str:
    """Run `script` (Python source; `sys.argv[1]` is `root`) as rank 0 of 1 on `port`; its stdout.

    The script runs from the project root, so it can import this module as `tests.train.one_rank`.
    """
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(root)], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def tiny_samples(root: Path, questions: int) -> tuple[Any, PruningConfig, list[dict[str, Any]]]:
    """(the tiny model, saved under `root / "base"`; `downsample` pruning resolved for it; the
    prepared training samples of a one-scene synthetic archive of `questions` questions)."""
    model, _ = build_tiny_model(seed=0, pruning_defaults=TINY_PRUNING_DEFAULTS)
    save_model(model, root / "base")
    archive = write_archive(str(root / "archive"), scenes=1, size=128, seed=3, split="train", questions_per_scene=questions)
    storage, model_config = StorageConfig(), load_model_config(str(root / "base"))
    pruning = resolve_pruning(PruningConfig(strategy="downsample"), model_config)
    tokenizer = load_tokenizer(str(root / "base"), storage)
    samples = [
        sample
        for line in Path(archive.train_jsonl).read_text().splitlines()
        for sample in prepare_sample(
            {"record": line}, tokenizer=tokenizer, model_config=model_config, pruning=pruning, image_root=archive.root,
            max_length=512, storage=storage, normalize=NormalizeConfig(),
        )
    ]  # fmt: skip
    return model, pruning, samples
