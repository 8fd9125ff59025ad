"""Fine-tuning benchmark (issue #6): training throughput per pruning strategy, ZeRO-2's optimizer-state
partition, and the memory a GPU needs at real sizes.

* Throughput: `run_finetune` as `python -m jobs.finetune` runs it (the tiny model of the training
  tests, `build_tiny_model` with the tiny pruning defaults, or `model`; the synthetic training
  split; `num_workers` workers on a local Ray, DeepSpeed over gloo), a few optimizer steps per
  strategy. The rate is each worker's samples over its busy time after its first
  optimizer step (`FinetuneSummary.steady_samples_per_s`): the first step also waits for Ray Data's
  first prepared batch and torch's lazy set-up, and checkpoint writes are never inside the busy time.
  Ray's own start, the worker group's start and the export are outside it too (they are in `wall s`).
* ZeRO-2 vs ZeRO-0: the same strategy run with `deepspeed.zero_stage=0`; the optimizer-state bytes
  each rank holds (`FinetuneSummary.optimizer_state_bytes`: Adam's moments) compared.
* Sizing: per-GPU memory of CLIP ViT-L/14-336 + Qwen2-7B under ZeRO-2 in bfloat16, from the exact
  parameter count of each part (the model built on the meta device) and the bytes ZeRO-2 keeps per
  parameter, with and without CPU optimizer offload. Activations are an assumption, stated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field

from uhr.bench.flops import real_model_config
from uhr.bench.inputs import bench_cache_dir, strategy_config
from uhr.cache import creating
from uhr.model import build_tiny_model, load_model_config, save_model
from uhr.model.config import UhrConfig
from uhr.model.modeling import UhrForConditionalGeneration
from uhr.model.pruning import PruningConfig, StrategyName
from uhr.pipeline.defaults import TINY_PRUNING_DEFAULTS
from uhr.pipeline.vqa import resolve_pruning
from uhr.scenes import open_scene
from uhr.storage import redact
from uhr.train import FinetuneConfig, FinetuneSummary, run_finetune
from uhr.train.config import DeepSpeedSettings, OptimizerConfig
from uhr.train.deepspeed_config import load_deepspeed_json
from uhr.train.defaults import training_archive
from uhr.train.loop import MODEL_PARTS, model_part

ZERO2_RATIO_TARGET = 0.55
"""Per-rank optimizer state under ZeRO-2 over ZeRO-0 at world size 2, at most."""

ADAM_STATE_BYTES = 8
"""Adam's two float32 moments per trained parameter."""


class SizingConfig(BaseModel):
    """The real-size memory estimate: how many GPUs share the ZeRO-2 partitions, and what is assumed."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(
        8, ge=1, description="Data-parallel ranks the gradients and optimizer state are partitioned over."
    )
    activation_gb: float = Field(
        8.0,
        ge=0,
        description="Assumed activations per GPU at micro-batch 1 with activation checkpointing (~1.3k LM positions): "
        "checkpointed layer inputs, one layer recomputed, float32 logits and their gradient, the projector's graph "
        "over the dense visual tokens. An assumption, not a measurement.",
    )
    gpu_memory_gb: list[float] = Field(
        default_factory=lambda: [24.0, 40.0, 80.0], description="GPU memory sizes (GB) the estimate is checked against."
    )


class TrainBenchConfig(BaseModel):
    """What `python -m jobs.bench_train` measures."""

    model_config = ConfigDict(extra="forbid")

    strategies: list[StrategyName] = Field(
        default_factory=lambda: list(StrategyName), description="Strategies trained with ZeRO-2, in this order."
    )
    steps: int = Field(
        4, ge=2, description="Optimizer steps per run; each worker's first is left out of the steady rate."
    )
    batch_size: int = Field(4, ge=1, description="Global batch per optimizer step (micro-batch 1 per worker).")
    num_workers: int = Field(2, ge=1, description="Training workers (ranks) on the local Ray.")
    model: str | None = Field(
        None,
        description="Model to fine-tune (directory or object-store URI); None: `build_tiny_model(seed=model_seed)` "
        "with the tiny pruning defaults, saved once under cache_dir.",
    )
    model_seed: int = Field(0, ge=0, description="Seed of the tiny model's weights.")
    zero0_strategy: StrategyName | None = Field(
        None,
        description="Strategy of the ZeRO-0 run the ZeRO-2 optimizer state is compared with; None: the default "
        "model's default strategy.",
    )
    cache_dir: Path = Field(
        default_factory=bench_cache_dir,
        description="Where the tiny model is kept and the runs' checkpoints and exports are written (replaced).",
    )
    sizing: SizingConfig = Field(default_factory=SizingConfig, description="The real-size memory estimate.")


@dataclass
class TrainRun:
    """One `run_finetune` of the benchmark."""

    strategy: str
    zero_stage: int
    budget: int
    summary: FinetuneSummary

    @property
    def steady_rates(self) -> list[float]:
        """Per worker, samples/s after its first optimizer step (the ranks that ran two or more)."""
        return [rate for rate in self.summary.steady_samples_per_s if rate is not None]

    @property
    def state_bytes(self) -> int:
        """Optimizer-state bytes of the rank holding the most."""
        return max(self.summary.optimizer_state_bytes)


@dataclass
class TrainBenchResult:
    """The benchmark's runs: every strategy under ZeRO-2, and the ZeRO-0 comparison run."""

    config: TrainBenchConfig
    model: str
    """The model fine-tuned (path or URI)."""
    trained_parameters: int
    """Parameters the default optimizer settings train in the benchmarked model (tower frozen)."""
    runs: list[TrainRun] = field(default_factory=list)
    zero0: TrainRun | None = None

    @property
    def zero2(self) -> TrainRun | None:
        """The ZeRO-2 run of the ZeRO-0 run's strategy."""
        if self.zero0 is None:
            return None
        return next((r for r in self.runs if r.strategy == self.zero0.strategy), None)

    @property
    def zero_ratio(self) -> float | None:
        """Per-rank optimizer state, ZeRO-2 over ZeRO-0 (the fullest rank of each)."""
        if self.zero0 is None or self.zero2 is None:
            return None
        return self.zero2.state_bytes / self.zero0.state_bytes


# ----------------------------------------------------------------------------------------------
# Parameters of the model's parts
# ----------------------------------------------------------------------------------------------


def part_parameters(config: UhrConfig) -> dict[str, int]:
    """Parameters of each part (`uhr.train.loop.MODEL_PARTS`) of the model `config` describes.

    The model is built on the meta device: exact counts, no memory, no weights.
    """
    with torch.device("meta"):
        model = UhrForConditionalGeneration(config)
    counts = dict.fromkeys(MODEL_PARTS, 0)
    for name, parameter in model.named_parameters():  # tied parameters are listed once
        counts[model_part(name)] += parameter.numel()
    return counts


def trained_parameters(counts: dict[str, int], optimizer: OptimizerConfig) -> int:
    """Parameters of the parts `optimizer` trains."""
    return sum(count for part, count in counts.items() if getattr(optimizer, part).train)


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def saved_tiny_model(cache_dir: Path, seed: int = 0) -> Path:
    """The training tests' tiny model (32-px tiles, `TINY_PRUNING_DEFAULTS`) saved under `cache_dir` once."""
    path = cache_dir / "models" / f"tiny-qwen2-seed{seed}"
    with creating(path):
        if not (path / "config.json").exists():
            model, _ = build_tiny_model(seed=seed, pruning_defaults=TINY_PRUNING_DEFAULTS)
            save_model(model, path)
    return path


def _finetune_config(
    config: TrainBenchConfig, model: str, pruning: PruningConfig, zero_stage: int, output: Path
) -> FinetuneConfig:
    name = f"{pruning.strategy.value}-zero{zero_stage}"
    return FinetuneConfig(
        model=model,
        pruning=pruning,
        scaling={"num_workers": config.num_workers},
        deepspeed={"zero_stage": zero_stage},
        batch_size=config.batch_size,
        max_steps=config.steps,
        checkpoint_every_steps=config.steps,
        keep_checkpoints=1,
        log_every_steps=config.steps,
        # A benchmark run that loses a worker is not a measurement: fail instead of restarting.
        max_failures=0,
        output=str(output),
        name=name,
        overwrite=True,
    )


def _run(
    config: TrainBenchConfig,
    model: str,
    strategy: StrategyName,
    zero_stage: int,
    model_config: UhrConfig,
    size: tuple[int, int],
) -> TrainRun:
    pruning = strategy_config(strategy, model_config, *size)
    finetune = _finetune_config(config, model, pruning, zero_stage, config.cache_dir.expanduser() / "train-runs")
    summary = run_finetune(finetune)
    budget = resolve_pruning(pruning, model_config).budget
    return TrainRun(strategy=strategy.value, zero_stage=zero_stage, budget=budget, summary=summary)


def run_train_benchmark(config: TrainBenchConfig) -> TrainBenchResult:
    """Every configured strategy under ZeRO-2, then one under ZeRO-0; see the module docstring.

    Uses the Ray already initialised in this process, or starts a local one (stopped at the end).
    """
    model = config.model or str(saved_tiny_model(config.cache_dir.expanduser(), config.model_seed))
    model_config = load_model_config(model)
    archive = training_archive()
    with open_scene(archive.scenes[0]) as scene:
        size = (scene.width, scene.height)
    zero0_strategy = config.zero0_strategy or resolve_pruning(PruningConfig(), model_config).strategy
    result = TrainBenchResult(
        config=config,
        model=model,
        trained_parameters=trained_parameters(part_parameters(model_config), OptimizerConfig()),
    )
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=ray_cpus(config), log_to_driver=False)
    try:
        zero2 = list(dict.fromkeys([*config.strategies, zero0_strategy]))  # the ZeRO-0 comparison needs its pair
        for strategy in zero2:
            result.runs.append(_run(config, model, StrategyName(strategy), 2, model_config, size))
        result.zero0 = _run(config, model, StrategyName(zero0_strategy), 0, model_config, size)
    finally:
        if started:
            ray.shutdown()
    return result


# ----------------------------------------------------------------------------------------------
# Real-size memory per GPU
# ----------------------------------------------------------------------------------------------

_GB = 1e9


@dataclass(frozen=True)
class GpuMemory:
    """Bytes per GPU of one ZeRO-2 set-up (bfloat16 weights, float32 master weights and Adam moments)."""

    weights: int
    """bf16 copy of every parameter, frozen tower included (ZeRO-2 replicates weights)."""
    gradients: int
    """bf16 gradient partition: 1/N of the trained parameters' gradients."""
    master: int
    """float32 master weights of the partition."""
    adam: int
    """Adam's two float32 moments of the partition."""
    step_gradients: int
    """float32 copy of the gradient partition that exists during the optimizer step."""
    buffers: int
    """Communication buckets (bf16): two reduce buckets (overlap_comm) and one all-gather bucket."""
    activations: int
    offload: bool
    cpu: int
    """Pinned host memory per rank with offload: master weights, moments and the float32 gradients."""

    @property
    def total(self) -> int:
        return (
            self.weights + self.gradients + self.master + self.adam + self.step_gradients + self.buffers
            + self.activations
        )  # fmt: skip


def zero2_memory(
    counts: dict[str, int], optimizer: OptimizerConfig, sizing: SizingConfig, offload: bool, zero_json: dict
) -> GpuMemory:
    """Per-GPU memory under ZeRO-2 over `sizing.gpus` ranks (DeepSpeed's own estimator,
    `estimate_zero2_model_states_mem_needs`, counts the same 2 + 18/N bytes per parameter when all train).

    With `offload` the float32 partition (master weights, moments, gradients) lives in host memory and
    the GPU keeps the bf16 weights and the buckets.
    """
    everything, trained, n = sum(counts.values()), trained_parameters(counts, optimizer), sizing.gpus
    zero = zero_json.get("zero_optimization", {})
    reduce_bucket = int(zero.get("reduce_bucket_size", 5e8))
    allgather_bucket = int(zero.get("allgather_bucket_size", 5e8))
    partition = math.ceil(trained / n)
    host = partition * (4 + ADAM_STATE_BYTES + 4)
    return GpuMemory(
        weights=2 * everything,
        gradients=0 if offload else 2 * partition,
        master=0 if offload else 4 * partition,
        adam=0 if offload else ADAM_STATE_BYTES * partition,
        step_gradients=0 if offload else 4 * partition,
        buffers=2 * (2 * reduce_bucket + allgather_bucket),
        activations=round(sizing.activation_gb * _GB),
        offload=offload,
        cpu=host if offload else 0,
    )


def sizing_report(sizing: SizingConfig, deepspeed_json: str | None = None) -> list[str]:
    """Markdown: the per-GPU memory of CLIP ViT-L/14-336 + Qwen2-7B under ZeRO-2, with the calculation."""
    path = deepspeed_json or DeepSpeedSettings().config
    zero_json = load_deepspeed_json(path)
    counts = part_parameters(real_model_config())
    optimizer = OptimizerConfig()
    everything, trained, n = sum(counts.values()), trained_parameters(counts, optimizer), sizing.gpus
    plain, offloaded = (zero2_memory(counts, optimizer, sizing, offload, zero_json) for offload in (False, True))

    def gb(value: float) -> str:
        return f"{value / _GB:.1f}"

    zero = zero_json.get("zero_optimization", {})
    frozen = [part for part in MODEL_PARTS if not getattr(optimizer, part).train]
    lines = [
        f"## Sizing: CLIP ViT-L/14-336 + Qwen2-7B, ZeRO-2 on {n} GPUs, bfloat16",
        "",
        "Parameters (the model built from its config on the meta device, parts as `uhr.train.loop.MODEL_PARTS`): "
        + ", ".join(f"{part} {count / 1e6:,.1f} M" for part, count in counts.items())
        + f"; {everything / 1e9:.2f} B in all, {trained / 1e9:.2f} B trained with the default optimizer settings "
        f"({', '.join(frozen) or 'nothing'} frozen: weights only, no gradients or optimizer state).",
        "",
        f"Per GPU, Φ = all parameters, Φt = trained ones, N = {n}: bf16 weights 2Φ (ZeRO-2 keeps every weight on "
        "every rank); bf16 gradient partition 2Φt/N; float32 master weights 4Φt/N; Adam moments 8Φt/N; float32 "
        "gradient partition 4Φt/N while the optimizer steps (DeepSpeed converts the bf16 partition for the update); "
        f"buckets 2 x reduce_bucket_size + allgather_bucket_size = 2 x {zero.get('reduce_bucket_size'):.0e} + "
        f"{zero.get('allgather_bucket_size'):.0e} bf16 elements ({path}; two reduce buckets with overlap_comm). "
        "Offload (`deepspeed.offload_optimizer=true`, GeoLLaVA-8K's setting) moves master weights, moments and the "
        "float32 gradients to pinned host memory, 16Φt/N per rank; the GPU keeps the weights and the buckets. "
        f"Activations: {sizing.activation_gb:g} GB assumed (micro-batch 1, activation checkpointing; not measured).",
        "",
        "| per GPU, GB | weights 2Φ | gradients 2Φt/N | master 4Φt/N | Adam 8Φt/N | fp32 grads at step 4Φt/N | "
        "buckets | activations (assumed) | **total** | host per rank | host per 8-GPU node |",
        "|" + "---|" * 11,
    ]
    for label, m in (("ZeRO-2", plain), ("ZeRO-2 + CPU offload", offloaded)):
        lines.append(
            f"| {label} | {gb(m.weights)} | {gb(m.gradients)} | {gb(m.master)} | {gb(m.adam)} | "
            f"{gb(m.step_gradients)} | {gb(m.buffers)} | {gb(m.activations)} | **{gb(m.total)}** | {gb(m.cpu)} | "
            f"{gb(8 * m.cpu)} |"
        )
    resident = plain.weights + plain.gradients + plain.master + plain.adam
    fits = []
    for size in sizing.gpu_memory_gb:
        ok = [label for label, m in (("ZeRO-2", plain), ("with offload", offloaded)) if m.total <= size * _GB]
        fits.append(f"{size:g} GB: {', '.join(ok) if ok else 'neither'}")
    lines += [
        "",
        f"Weights and resident ZeRO-2 state without offload: {gb(plain.weights)} + "
        f"{gb(plain.gradients + plain.master + plain.adam)} = {gb(resident)} GB per GPU (the ~29 GB of "
        "configs/train/cluster.yaml); the optimizer step adds the float32 gradient partition. Fits: "
        + "; ".join(fits)
        + f". ZeRO-0 (all of it replicated) would hold 2Φ + 14Φt = {gb(2 * everything + 14 * trained)} GB per GPU "
        "before the step and activations.",
    ]
    return lines


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

_MIB = 1 << 20


def _rates(values: list[float | None]) -> str:
    return ", ".join("-" if value is None else f"{value:.3f}" for value in values)


def format_report(result: TrainBenchResult) -> str:
    """Markdown: throughput per strategy, ZeRO-2 vs ZeRO-0 optimizer state, then the real-size sizing."""
    config = result.config
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    grad_accumulation = config.batch_size // config.num_workers
    lines = [
        f"## Fine-tuning {'the tiny model' if config.model is None else 'the model'} on the synthetic training "
        f"split, {config.num_workers} workers, local Ray, DeepSpeed over gloo, this CPU",
        "",
        f"Model {redact(result.model)} ({result.trained_parameters:,} trained parameters).",
        "",
        f"Load average at the end {load}; Ray CPUs {ray_cpus(config)}; {config.steps} optimizer steps of "
        f"{config.batch_size} samples per run (micro-batch 1 x {config.num_workers} workers x {grad_accumulation} "
        "accumulation), float32. `steady`: each worker's samples over its busy time after its first optimizer step "
        "(which also waits for Ray Data's first batch and lazy set-up; in runs this short the later steps mostly take "
        "samples prepared meanwhile, so it is the workers' training rate, not what the CPU preparation stage sustains "
        "over a long run); `overall`: from its first batch request; "
        "checkpoint writes excluded from both. `wall s`: the whole `run_finetune` (Ray Data, worker group start, "
        "training, checkpoint, export).",
        "",
        "| strategy | ZeRO | budget | steady samples/s per worker | mean | overall samples/s per worker | wall s | "
        "Adam moments MiB per rank | loss first -> last |",
        "|" + "---|" * 9,
    ]
    for r in [*result.runs, *([result.zero0] if result.zero0 else [])]:
        s = r.summary
        mean = sum(r.steady_rates) / len(r.steady_rates) if r.steady_rates else float("nan")
        state = ", ".join(f"{count / _MIB:.3f}" for count in s.optimizer_state_bytes)
        losses = s.losses
        lines.append(
            f"| {r.strategy} | {r.zero_stage} | {r.budget} | {_rates(s.steady_samples_per_s)} | {mean:.3f} | "
            f"{_rates(s.samples_per_s)} | {s.wall_s:.1f} | {state} | {losses[0]:.3f} -> {losses[-1]:.3f} |"
        )
    ratio = result.zero_ratio
    if ratio is not None and result.zero0 is not None and result.zero2 is not None:
        adam = ADAM_STATE_BYTES * result.trained_parameters
        lines += [
            "",
            f"Adam moments per rank, ZeRO-2 / ZeRO-0 ({result.zero0.strategy}, world size {config.num_workers}): "
            f"{result.zero2.state_bytes:,} / {result.zero0.state_bytes:,} bytes = {ratio:.3f} (target <= "
            f"{ZERO2_RATIO_TARGET}): {'met' if ratio <= ZERO2_RATIO_TARGET else 'MISSED'}. Adam's moments of all "
            f"{result.trained_parameters:,} trained parameters: {adam:,} bytes (ZeRO-0 holds moments only for "
            "parameters that received a gradient; ZeRO-2's flat partitions cover every trained parameter, padded for "
            "alignment). Not counted: ZeRO-2's float32 master copy of its partition, half the moments' bytes, which "
            "a float32 ZeRO-0 run does without (it steps the model's own weights) and a bf16 ZeRO-0 run holds whole.",
        ]
    lines += ["", *sizing_report(config.sizing)]
    return "\n".join(lines)


def ray_cpus(config: TrainBenchConfig) -> int:
    """CPUs of the local Ray the benchmark starts: the workers' plus one preparation task's, as
    `jobs.finetune` starts one (at least this machine's)."""
    needed = config.num_workers * FinetuneConfig().scaling.cpus_per_worker + FinetuneConfig().data.num_cpus
    return max(os.cpu_count() or 1, math.ceil(needed))


__all__ = [
    "ADAM_STATE_BYTES",
    "ZERO2_RATIO_TARGET",
    "GpuMemory",
    "SizingConfig",
    "TrainBenchConfig",
    "TrainBenchResult",
    "TrainRun",
    "format_report",
    "part_parameters",
    "run_train_benchmark",
    "saved_tiny_model",
    "sizing_report",
    "trained_parameters",
    "zero2_memory",
]
