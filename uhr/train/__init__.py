"""Fine-tuning with Ray Train and DeepSpeed ZeRO-2, pruning in the loop.

* `FinetuneConfig` (config.py) — the job's typed config;
* `run_finetune(config) -> FinetuneSummary` (trainer.py) — TorchTrainer run, resume, export;
* `build_training_dataset`, `SkipLedger`, `PreparedSource` (data.py) — manifests to prepared samples;
* `fill_deepspeed_config` (deepspeed_config.py) — the DeepSpeed JSON's "auto" fields;
* `train_loop_per_worker`, `TrainPlan` (loop.py) — what each worker runs;
* `export_model` (export.py) — a checkpoint in the project's model format.
"""

from __future__ import annotations

from uhr.train.config import FinetuneConfig
from uhr.train.data import PreparedSource, SkipLedger, build_training_dataset
from uhr.train.deepspeed_config import fill_deepspeed_config
from uhr.train.export import export_model
from uhr.train.loop import TrainPlan, train_loop_per_worker
from uhr.train.trainer import FinetuneSummary, run_finetune

__all__ = [
    "FinetuneConfig",
    "FinetuneSummary",
    "PreparedSource",
    "SkipLedger",
    "TrainPlan",
    "build_training_dataset",
    "export_model",
    "fill_deepspeed_config",
    "run_finetune",
    "train_loop_per_worker",
]
