"""Whether a fine-tuning run can resume from the checkpoints its output already holds.

A DeepSpeed checkpoint restores more than weights: its ZeRO partitions fit only the number of ranks
that wrote them, the optimizer's groups bring back their own learning rates, weight decay and
Adam's betas and eps (the scheduler its base learning rates), and the loop's position in an epoch
is counted in micro-batches per worker. A re-run that changed any of these would fail on every
worker after Ray started them, or silently train with the checkpoint's values instead of the
configured ones. Every checkpoint therefore carries the settings it was written under
(`RESUME_FILE`), and the driver compares them with the new run before Ray starts. What a resume
does take from the new config (`max_steps`, warmup, clipping, the data) is left out. The number of
workers and the micro-batch size may change under ZeRO-1/2 (`ELASTIC`): the partitions are then
loaded from the checkpoint's universal form and the epoch position is re-counted.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs
import ray

from uhr.config import ConfigError
from uhr.storage import StorageConfig, is_remote, join_uri, redact
from uhr.train.config import FinetuneConfig

CHECKPOINT_TAG = "deepspeed"
"""DeepSpeed tag (sub-directory) of the engine state inside each reported checkpoint."""

RESUME_FILE = "uhr_resume.json"
"""Settings file rank 0 writes into every checkpoint directory."""


def resume_settings(config: FinetuneConfig, zero_stage: int) -> dict[str, Any]:
    """The settings a checkpoint of this run binds a resume to, as flat JSON-ready `key: value`."""
    optimizer = config.optimizer
    settings: dict[str, Any] = {
        "scaling.num_workers": config.scaling.num_workers,
        "micro_batch_size": config.micro_batch_size,
        "deepspeed.zero_stage": zero_stage,
        "deepspeed.precision": config.precision.value,
        "optimizer.weight_decay": optimizer.weight_decay,
        "optimizer.betas": list(optimizer.betas),
        "optimizer.eps": optimizer.eps,
    }
    for part in ("vision_tower", "projector", "language_model"):
        settings[f"optimizer.{part}.train"] = getattr(optimizer, part).train
        settings[f"optimizer.{part}.lr"] = getattr(optimizer, part).lr
    return settings


def checkpoint_settings(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The settings `checkpoint` was written under (`RESUME_FILE`), read without downloading the
    rest; empty for a checkpoint from before checkpoints carried them."""
    path = f"{checkpoint.path}/{RESUME_FILE}"
    if checkpoint.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return {}
    with checkpoint.filesystem.open_input_stream(path) as file:
        return json.load(file)


def _checkpoint_step(path: str) -> int | None:
    digits = path.rstrip("/").rsplit("/", 1)[-1].removeprefix("checkpoint-")
    return int(digits) if digits.isdigit() else None


def latest_checkpoint(run_uri: str, storage: StorageConfig) -> str | None:
    """The run's newest checkpoint directory (`checkpoint-<step>`, the highest step), or None."""
    fs = storage.filesystem(run_uri)
    if not fs.exists(run_uri):
        return None
    found = [path for path in fs.glob(join_uri(run_uri, "checkpoint-*")) if _checkpoint_step(path) is not None]
    latest = max(found, key=_checkpoint_step, default=None)
    if latest is None or not is_remote(run_uri):
        return latest
    return fs.unstrip_protocol(latest)  # object stores list keys without their protocol


ELASTIC = ("scaling.num_workers", "micro_batch_size")
"""Bound settings a resume may change under ZeRO-1/2: a worker group of another size loads the
checkpoint's universal form (`uhr.train.universal`), and the interrupted epoch's position is
carried over in samples (`uhr.train.loop.restore_checkpoint`)."""


def check_resume(run_uri: str, config: FinetuneConfig, zero_stage: int, storage: StorageConfig) -> None:
    """Raise `ConfigError` when the run's latest checkpoint was written under settings this config changes.

    Nothing to check without a checkpoint, or for one written before checkpoints carried their
    settings. Another number of workers or micro-batch size passes under ZeRO-1/2 (`ELASTIC`).
    """
    checkpoint = latest_checkpoint(run_uri, storage)
    if checkpoint is None:
        return
    fs = storage.filesystem(checkpoint)
    path = join_uri(checkpoint, RESUME_FILE)
    if not fs.exists(path):
        return
    with fs.open(path, "r") as file:
        saved = json.load(file)
    current = resume_settings(config, zero_stage)
    free = ELASTIC if zero_stage in (1, 2) else ()
    changed = [
        f"{key} {saved[key]!r} -> {value!r}"
        for key, value in current.items()
        if key in saved and saved[key] != value and key not in free
    ]
    if changed:
        elastic_changed = any(key in ELASTIC and saved[key] != value for key, value in current.items() if key in saved)
        elastic = " (another number of workers or micro-batch size needs ZeRO stage 1 or 2)" if elastic_changed else ""
        raise ConfigError(
            f"run {redact(run_uri)} resumes from {redact(checkpoint)}, written with other settings: {'; '.join(changed)}. "
            f"A resume keeps the checkpoint's ZeRO partitions, optimizer state and epoch position{elastic}: re-run with "
            "its settings, or start afresh with --overwrite (or another name)"
        )


__all__ = ["CHECKPOINT_TAG", "ELASTIC", "RESUME_FILE", "check_resume", "checkpoint_settings", "latest_checkpoint", "resume_settings"]
