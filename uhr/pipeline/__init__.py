"""The archive-wide VQA job on Ray Data: plan, read, encode + prune, answer, write GeoParquet.

`run_vqa(VqaConfig(...))` runs it; `build_vqa_dataset` gives the lazy Ray Data pipeline alone.
"""

from __future__ import annotations

from uhr.pipeline.config import ActorStageConfig, Precision, ReadStageConfig, VqaConfig
from uhr.pipeline.output import MANIFEST_NAME, OUTPUT_SCHEMA
from uhr.pipeline.plan import InputError, load_questions
from uhr.pipeline.vqa import RunSummary, build_vqa_dataset, run_vqa

__all__ = [
    "MANIFEST_NAME",
    "OUTPUT_SCHEMA",
    "ActorStageConfig",
    "InputError",
    "Precision",
    "ReadStageConfig",
    "RunSummary",
    "VqaConfig",
    "build_vqa_dataset",
    "load_questions",
    "run_vqa",
]
