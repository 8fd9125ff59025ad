"""The archive-wide VQA job on Ray Data: plan, read, encode + prune, answer, write GeoParquet.

`run_vqa(VqaConfig(...))` runs it; `build_vqa_dataset` gives the lazy Ray Data pipeline alone.
Names are imported on first use (`uhr._lazy`), so the read tasks' modules stay light.
"""

from __future__ import annotations

from uhr._lazy import lazy_exports

_EXPORTS = {
    "ActorStageConfig": "uhr.pipeline.config",
    "Precision": "uhr.pipeline.config",
    "ReadStageConfig": "uhr.pipeline.config",
    "VqaConfig": "uhr.pipeline.config",
    "MANIFEST_NAME": "uhr.pipeline.output",
    "OUTPUT_SCHEMA": "uhr.pipeline.output",
    "OutputError": "uhr.pipeline.output",
    "InputError": "uhr.pipeline.plan",
    "load_questions": "uhr.pipeline.plan",
    "RunSummary": "uhr.pipeline.vqa",
    "build_vqa_dataset": "uhr.pipeline.vqa",
    "run_vqa": "uhr.pipeline.vqa",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
