"""The DeepSpeed JSON with its "auto" fields filled from the run's `FinetuneConfig`.

The JSON (`configs/train/zero2.json`) keeps what is DeepSpeed's business (ZeRO buckets, partition
switches); the run config owns what must agree with the rest of the job (batch arithmetic,
learning rates, clipping, precision, offload). `AUTO_FIELDS` is the table of what fills each
"auto"; an "auto" left anywhere else is an error naming its key.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uhr.config import ConfigError
from uhr.pipeline.config import Precision
from uhr.train.config import FinetuneConfig

AUTO = "auto"


def _peak_lr(config: FinetuneConfig) -> float:
    # Every parameter group carries its own lr; this is only DeepSpeed's default for groups without one.
    parts = (config.optimizer.vision_tower, config.optimizer.projector, config.optimizer.language_model)
    return max(part.lr for part in parts if part.train)


AUTO_FIELDS: dict[tuple[str, ...], Callable[[FinetuneConfig], Any]] = {
    ("train_batch_size",): lambda c: c.batch_size,
    ("train_micro_batch_size_per_gpu",): lambda c: c.micro_batch_size,
    ("gradient_accumulation_steps",): lambda c: c.gradient_accumulation_steps,
    ("gradient_clipping",): lambda c: c.optimizer.grad_clip,
    ("optimizer", "params", "lr"): _peak_lr,
    ("optimizer", "params", "betas"): lambda c: list(c.optimizer.betas),
    ("optimizer", "params", "eps"): lambda c: c.optimizer.eps,
    ("optimizer", "params", "weight_decay"): lambda c: c.optimizer.weight_decay,
    # CPU runs have no fused (CUDA) Adam; GPU runs use DeepSpeed's fused or, offloaded, its CPU Adam.
    ("optimizer", "params", "torch_adam"): lambda c: not c.scaling.use_gpu,
    ("bf16", "enabled"): lambda c: c.precision == Precision.BF16,
    ("fp16", "enabled"): lambda c: False,
    ("zero_optimization", "stage"): lambda c: 2 if c.deepspeed.zero_stage is None else c.deepspeed.zero_stage,
    ("zero_optimization", "offload_optimizer", "device"): lambda c: "cpu" if c.deepspeed.offload_optimizer else "none",
    # Overlapping gradient reduction with backward needs CUDA streams.
    ("zero_optimization", "overlap_comm"): lambda c: c.scaling.use_gpu,
}
"""Key path in the DeepSpeed JSON -> what fills it when it says "auto"."""

OWNED: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "batch_size",
    ("train_micro_batch_size_per_gpu",): "micro_batch_size",
    ("gradient_accumulation_steps",): "batch_size / (micro_batch_size x scaling.num_workers)",
    ("gradient_clipping",): "optimizer.grad_clip",
    ("optimizer", "params", "betas"): "optimizer.betas",
    ("optimizer", "params", "eps"): "optimizer.eps",
    ("optimizer", "params", "weight_decay"): "optimizer.weight_decay",
    ("bf16", "enabled"): "deepspeed.precision",
    ("fp16", "enabled"): "deepspeed.precision",
}
"""Keys the run config owns -> the run-config field that sets them. A value the JSON fixes must agree
with it, and a missing one is written: DeepSpeed's own default (no clipping, float32) would
otherwise train in a way the run config and its summary do not say."""


# The checkout `uhr` runs from: relative config paths not found in the working directory are looked
# up here, so the default works from any directory.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def load_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` as a dict; a relative path is taken from the working directory,
    else from the project root (where `configs/train/zero2.json`, the default, lives)."""
    file = Path(path)
    if not file.is_absolute() and not file.exists() and (PROJECT_ROOT / file).exists():
        file = PROJECT_ROOT / file
    try:
        raw = json.loads(file.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object, got {type(raw).__name__}")
    return raw


def _autos(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, dict):
        return [found for key, value in tree.items() for found in _autos(value, (*path, str(key)))]
    return [path] if tree == AUTO else []


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def fill_deepspeed_config(raw: dict[str, Any], config: FinetuneConfig, source: str = "DeepSpeed config") -> dict[str, Any]:
    """A copy of `raw` with every "auto" filled from `config` (see `AUTO_FIELDS`).

    `deepspeed.zero_stage` (when set) replaces the JSON's stage and `deepspeed.offload_optimizer`
    moves the optimizer state to CPU whatever the JSON says. What the run config owns (`OWNED`: batch
    arithmetic, clipping, Adam's betas, eps and weight decay, precision) is written where the JSON
    leaves it out and must agree where it fixes it. Raises `ConfigError` naming any "auto" no rule
    fills, or a fixed value that disagrees.
    """
    filled = copy.deepcopy(raw)
    unknown = [path for path in _autos(filled) if path not in AUTO_FIELDS]
    if unknown:
        names = ", ".join(".".join(path) for path in unknown)
        raise ConfigError(f"{source}: no rule fills \"auto\" at {names} (known: {', '.join('.'.join(p) for p in AUTO_FIELDS)})")
    for path in _autos(filled):
        _set(filled, path, AUTO_FIELDS[path](config))
    if config.deepspeed.zero_stage is not None:
        _set(filled, ("zero_optimization", "stage"), config.deepspeed.zero_stage)
    if config.deepspeed.offload_optimizer:
        _set(filled, ("zero_optimization", "offload_optimizer", "device"), "cpu")
    if filled.get("bf16", {}).get("enabled") and not config.scaling.use_gpu:
        raise ConfigError(f"{source}: bf16 is enabled but the run trains on CPUs (scaling.use_gpu=false)")
    for path, owner in OWNED.items():
        if path[0] == "optimizer" and "optimizer" not in filled:
            continue  # no optimizer section: DeepSpeed builds none, and these have nothing to set
        node: Any = filled
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        expected = AUTO_FIELDS[path](config)
        if node is None:
            _set(filled, path, expected)
        elif node != expected:
            raise ConfigError(
                f"{source}: {'.'.join(path)}={node!r} disagrees with the run config's {owner} ({expected!r}); "
                'set it to "auto"'
            )
    return filled


def zero_stage(filled: dict[str, Any]) -> int:
    """The ZeRO stage of a filled DeepSpeed config (0 when it has no zero_optimization section)."""
    return int(filled.get("zero_optimization", {}).get("stage", 0))
