"""The fine-tuning job: resolve the inputs on the driver, run `TorchTrainer`, export the result.

`run_finetune(config)` checks everything it can before Ray starts (model, manifest, DeepSpeed
JSON), builds the Ray Data pipeline of prepared samples, trains on `scaling.num_workers` workers
with DeepSpeed (ZeRO-2 by default), and exports the last checkpoint in the project's model format.
Checkpoints live under `<output>/<name>/` (local or object storage); running the same command
again resumes from the latest one (Ray Train restores the run from its snapshot in that
directory), also on another number of workers (`uhr.train.universal`), and a worker lost mid-run
restarts the worker group from it (`max_failures`); with `scaling.min_workers` the group may
restart smaller, and grow back as nodes come (elastic training).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from uhr.config import ConfigError
from uhr.model import load_model_config
from uhr.pipeline.defaults import default_model
from uhr.pipeline.vqa import connect_ray, resolve_pruning, worker_env
from uhr.storage import StorageConfig, absolute_uri, join_uri, redact
from uhr.train.config import FinetuneConfig
from uhr.train.data import (
    SkipLedger,
    arrow_filesystem,
    build_training_dataset,
    count_records,
    default_image_root,
    load_tokenizer,
)
from uhr.train.deepspeed_config import fill_deepspeed_config, load_deepspeed_json, zero_stage
from uhr.train.defaults import training_archive
from uhr.train.export import export_memory_bytes, export_task
from uhr.train.loop import TrainPlan, train_loop_per_worker
from uhr.train.resume import check_resume

logger = logging.getLogger(__name__)


@dataclass
class FinetuneSummary:
    """What a fine-tuning run did, printed by the job."""

    run: str
    export: str
    steps: int
    total_steps: int
    epochs: int
    history: list[tuple[int, float]]
    resumed_from: list[int]
    skipped: dict[str, Any]
    nodes: list[str]
    samples: list[int]
    optimizer_state_bytes: list[int]
    samples_per_s: list[float]
    wall_s: float
    steady_samples_per_s: list[float | None] = field(default_factory=list)
    """Per rank, samples/s after the worker process's first optimizer step (Ray Data's first batch,
    lazy set-up); None where a process ran fewer than two steps."""
    grounding_history: list[tuple[int, float]] = field(default_factory=list)
    """(step, grounding loss) of the steps that had evidence, when `grounding.weight` > 0."""

    @property
    def losses(self) -> list[float]:
        return [loss for _, loss in self.history]

    def format(self) -> str:
        """A few lines: progress, the loss curve in brief, throughput, skipped samples, where things are."""
        curve = _curve(self.history) if self.history else "no steps run"
        grounding = [f"  grounding loss {_curve(self.grounding_history)}"] if self.grounding_history else []
        resumed = f", resumed from step {', '.join(map(str, self.resumed_from))}" if self.resumed_from else ""
        rates = ", ".join(f"{rate:.2f}" for rate in self.samples_per_s)
        state = ", ".join(f"{count / 2**20:.2f}" for count in self.optimizer_state_bytes)
        kinds = ", ".join(f"{kind} {count}" for kind, count in self.skipped.get("by_kind", {}).items())
        return "\n".join(
            [
                f"fine-tuning: {self.steps}/{self.total_steps} steps, {self.epochs + 1} epoch(s){resumed}, {self.wall_s:.1f} s",
                f"  loss           {curve}",
                *grounding,
                f"  workers        {len(self.nodes)} on {len(set(self.nodes))} node(s), {sum(self.samples)} samples trained",
                f"  samples/s      {rates} (per worker)",
                f"  Adam MiB       {state} (moments, per rank)",
                f"  skipped        {self.skipped.get('count', 0)} samples" + (f" ({kinds})" if kinds else ""),
                f"  checkpoints    {redact(self.run)}",
                f"  export         {redact(self.export)}",
            ]
        )


def _curve(history: list[tuple[int, float]]) -> str:
    """A loss curve in brief: first and last values, the minimum, the means of the first and last tenth."""
    losses = [loss for _, loss in history]
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    return (
        f"{losses[0]:.4f} at step {history[0][0]} -> {losses[-1]:.4f} at step {history[-1][0]} "
        f"(min {min(losses):.4f}; mean of first/last {window} steps {first:.4f} -> {last:.4f})"
    )


def _delete(uri: str, storage: StorageConfig) -> None:
    fs = storage.filesystem(uri)
    if fs.exists(uri):
        fs.rm(uri, recursive=True)


def run_finetune(config: FinetuneConfig) -> FinetuneSummary:
    """Fine-tune, checkpoint and export as `config` says; resumes a run that `output`/`name` already holds.

    Raises `ConfigError` before Ray starts when an input cannot be used.
    """
    start = time.monotonic()
    storage = config.storage
    # Ray Train workers do not run in this directory: local paths travel absolute.
    data = config.data.model_copy(
        update={key: absolute_uri(value) for key in ("manifest", "image_root") if (value := getattr(config.data, key))}
    )
    config = config.model_copy(
        update={
            "data": data,
            "output": absolute_uri(config.output),
            **{key: absolute_uri(value) for key in ("model", "export") if (value := getattr(config, key))},
        }
    )
    model_uri = config.model or default_model()
    model_config = load_model_config(model_uri, storage=storage)
    config = config.model_copy(update={"pruning": resolve_pruning(config.pruning, model_config)})
    deepspeed_json = load_deepspeed_json(config.deepspeed.config)
    # Each worker group fills it for its own size; filled here for every size it may take, so a JSON
    # that fixes the batch arithmetic of one size stops the run before Ray starts.
    for workers in config.worker_counts:
        source = f"DeepSpeed config {config.deepspeed.config}" + (f" (a group of {workers} workers)" if config.elastic else "")
        deepspeed_config = fill_deepspeed_config(deepspeed_json, config.for_workers(workers), source=source)
    manifest = config.data.manifest or training_archive().train_jsonl
    image_root = config.data.image_root or default_image_root(manifest)
    tokenizer = load_tokenizer(model_uri, storage)
    run_uri = join_uri(config.output, config.name)
    export_uri = config.export_uri
    if config.overwrite:
        _delete(run_uri, storage)
        _delete(export_uri, storage)
    stage = zero_stage(deepspeed_config)
    if config.elastic and stage not in (1, 2):
        raise ConfigError(f"elastic training (scaling.min_workers) needs ZeRO stage 1 or 2, got {stage}")
    check_resume(run_uri, config, stage, storage)

    # Every worker and one preparation task at once.
    connect_ray(min_cpus=config.scaling.num_workers * config.scaling.cpus_per_worker + config.data.num_cpus)
    runtime_env = worker_env(storage)
    records = count_records(manifest, storage)
    steps_per_epoch = records // config.batch_size
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    if total_steps < 1:
        raise ConfigError(
            f"manifest {redact(manifest)} has {records} records, fewer than one global batch of {config.batch_size}"
        )
    logger.info(
        "fine-tuning %s on %s: %d records, %d steps of %d samples (%d workers x %d micro-batch x %d accumulation)",
        redact(model_uri), redact(manifest), records, total_steps, config.batch_size,
        config.scaling.num_workers, config.micro_batch_size, config.gradient_accumulation_steps,
    )  # fmt: skip

    ledger = SkipLedger.remote()
    dataset = build_training_dataset(
        manifest,
        image_root,
        tokenizer=tokenizer,
        model_config=model_config,
        pruning=config.pruning,
        max_length=config.data.max_length,
        storage=storage,
        normalize=config.normalize,
        num_cpus=config.data.num_cpus,
        concurrency=config.data.concurrency,
        runtime_env=runtime_env,
        ledger=ledger,
    )
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    storage_filesystem, storage_path = arrow_filesystem(config.output, storage)
    worker_vars = dict(runtime_env["env_vars"])
    if not scaling.use_gpu:
        worker_vars["DS_ACCELERATOR"] = "cpu"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "plan": TrainPlan(config=config, model_uri=model_uri, deepspeed_config=deepspeed_json, total_steps=total_steps)
        },
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=(scaling.min_workers, scaling.num_workers) if config.elastic else scaling.num_workers,
            elastic_resize_monitor_interval_s=scaling.resize_interval_s,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy.value,
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env={**runtime_env, "env_vars": worker_vars},
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {redact(run_uri)} finished without a checkpoint to export")
    export = ray.get(
        export_task.options(runtime_env=runtime_env, memory=export_memory_bytes(model_config)).remote(
            result.checkpoint, model_uri, export_uri, storage, config.pruning
        )
    )
    done: dict[str, Any] = result.return_value
    return FinetuneSummary(
        run=run_uri,
        export=export,
        steps=done["steps"],
        total_steps=total_steps,
        epochs=done["epochs"],
        history=[tuple(item) for item in done["history"]],
        resumed_from=done["resumed_from"],
        skipped=ray.get(ledger.summary.remote()),
        nodes=done["nodes"],
        samples=done["samples"],
        optimizer_state_bytes=done["optimizer_state_bytes"],
        samples_per_s=done["samples_per_s"],
        wall_s=time.monotonic() - start,
        steady_samples_per_s=done["steady_samples_per_s"],
        grounding_history=[tuple(item) for item in done["grounding"]],
    )


__all__ = ["FinetuneSummary", "run_finetune"]
