"""What every training worker runs: `train_loop_per_worker(TrainPlan)` under Ray Train.

Read top to bottom: the plan the driver hands over, per-part freezing and learning rates, the
DeepSpeed engine, checkpoint save/restore, step and epoch counting, one micro-step with pruning in
the loop, then the loop.

Each worker loads the model, lets the pruning strategy encode and select on its samples (selection
is discrete; gradients flow through the kept and merged tokens into the projector and, when it
trains, the tower), and steps a DeepSpeed engine (ZeRO-2 by default: optimizer state and gradients
partitioned over the ranks). Every `checkpoint_every_steps` all ranks write their part of a
DeepSpeed checkpoint and report it, so Ray Train merges the parts into one checkpoint directory.
A restarted worker group (lost worker, re-run of the same command, an elastic group resized)
resumes from the latest one, whatever group size wrote it (`uhr.train.universal`): the step count
and schedule continue exactly, and the interrupted epoch goes on where it stopped:
each worker reads past as many micro-batches as that epoch had read at the checkpoint (counted,
not derived from steps: an epoch's last micro-batches that fill no step join the next epoch's
first; Ray Data cannot skip rows without reading them), so every epoch trains its share of steps
once and a run of `epochs` passes ends after them, not a partial epoch early. Which rows those are
is Ray Data's choice: its split hands blocks to the workers as they ask, so after a restart a few
rows of the interrupted epoch may be trained twice and as many not at all.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import ray
import ray.train
import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

from uhr.model import IGNORE_INDEX, load_model
from uhr.model.modeling import UhrForConditionalGeneration
from uhr.model.pruning import PrunedTokens, PruningStrategy, build_strategy
from uhr.storage import join_uri
from uhr.train.config import FinetuneConfig, OptimizerConfig
from uhr.train.data import PreparedSource, collate
from uhr.train.deepspeed_config import fill_deepspeed_config, zero_stage
from uhr.train.grounding import grounding_loss
from uhr.train.resume import CHECKPOINT_TAG, RESUME_FILE, checkpoint_settings, resume_settings
from uhr.train.universal import UNIVERSAL_TAG, convert_to_universal

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

logger = logging.getLogger(__name__)

MODEL_PARTS: dict[str, tuple[str, ...]] = {
    "vision_tower": ("vision_tower.",),
    "projector": ("multi_modal_projector.", "image_newline", "scale_embedding.", "reghead."),
    "language_model": ("language_model.",),
}
"""Parameter-name prefixes of each part `OptimizerConfig` configures; every parameter is in one."""


@dataclass
class TrainPlan:
    """What the driver resolved for the workers: the config, the model, DeepSpeed's JSON, the step count."""

    config: FinetuneConfig
    model_uri: str
    deepspeed_config: dict[str, Any]
    """The DeepSpeed JSON; a worker group fills its "auto" fields for its own size (`fill_deepspeed_config`)."""
    total_steps: int


@dataclass
class TrainState:
    """Loop state kept in every checkpoint (DeepSpeed's `client_state`)."""

    step: int = 0
    epoch: int = 0
    epoch_start: int = 0
    """Step count when the current epoch began."""
    epoch_batches: int = 0
    """Micro-batches of the current epoch this worker had read at the last optimizer step: a resume reads past them."""
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of every optimizer step: its objective, the LM loss per label token of all its
    micro-batches on all ranks plus the weighted grounding term."""
    resumed_from: list[int] = field(default_factory=list)
    """Steps training restarted from, one entry per resume."""
    grounding: list[tuple[int, float]] = field(default_factory=list)
    """(step, grounding loss) of every optimizer step that had evidence, when the loss is on."""


# ----------------------------------------------------------------------------------------------
# Parts, freezing, learning rates
# ----------------------------------------------------------------------------------------------


def model_part(name: str) -> str:
    """The part (`MODEL_PARTS` key) a parameter name belongs to."""
    for part, prefixes in MODEL_PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"parameter {name!r} belongs to none of the parts {sorted(MODEL_PARTS)}")


def parameter_groups(model: UhrForConditionalGeneration, optimizer: OptimizerConfig) -> list[dict[str, Any]]:
    """Freeze the parts that do not train; one optimizer group per training part with its lr.

    With weight decay on, each part's biases, norm gains and other vectors (parameters of fewer
    than two dimensions) go in a group of their own, `<part>.no_decay`, that is not decayed, as
    transformers' Trainer leaves biases and norms out. Tied parameters (an LM head sharing the
    embeddings) are listed once.
    """
    split = optimizer.weight_decay > 0
    groups: dict[str, list[torch.nn.Parameter]] = {
        name: [] for part in MODEL_PARTS for name in ((part, f"{part}.no_decay") if split else (part,))
    }
    for name, parameter in model.named_parameters():
        part = model_part(name)
        parameter.requires_grad_(getattr(optimizer, part).train)
        if parameter.requires_grad:
            groups[f"{part}.no_decay" if split and parameter.ndim < 2 else part].append(parameter)
    return [
        {
            "params": params,
            "lr": getattr(optimizer, name.removesuffix(".no_decay")).lr,
            "name": name,
            **({"weight_decay": 0.0} if name.endswith(".no_decay") else {}),
        }
        for name, params in groups.items()
        if params
    ]


# ----------------------------------------------------------------------------------------------
# Engine and checkpoints
# ----------------------------------------------------------------------------------------------


def build_engine(plan: TrainPlan, load_universal: bool = False) -> tuple[DeepSpeedEngine, UhrForConditionalGeneration]:
    """The model loaded from `plan.model_uri`, frozen and grouped by part, wrapped in a DeepSpeed engine.

    The schedule is transformers' cosine with linear warmup over `plan.total_steps`; DeepSpeed
    steps it at each optimizer step and keeps it in its checkpoints. `load_universal` makes the
    engine load checkpoints in DeepSpeed's universal form (`uhr.train.universal`).
    """
    import deepspeed  # after Ray Train set up the process group and the worker's DS_ACCELERATOR

    config = plan.config
    torch.manual_seed(config.seed)
    model, _ = load_model(plan.model_uri, storage=config.storage, dtype=torch.float32)
    model.train()
    groups = parameter_groups(model, config.optimizer)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    warmup = math.ceil(config.optimizer.warmup_ratio * plan.total_steps)
    schedule = partial(get_cosine_schedule_with_warmup, num_warmup_steps=warmup, num_training_steps=plan.total_steps)
    deepspeed_config = plan.deepspeed_config
    if load_universal:
        deepspeed_config = {**deepspeed_config, "checkpoint": {**deepspeed_config.get("checkpoint", {}), "load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=deepspeed_config, lr_scheduler=schedule)
    return engine, model


def inner_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch optimizer holding the Adam moments, under DeepSpeed's ZeRO / mixed-precision wrappers."""
    optimizer: Any = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(engine: DeepSpeedEngine) -> int:
    """Bytes of optimizer state (Adam moments) this rank holds: 1/world of the total under ZeRO-1/2."""
    state = inner_optimizer(engine).state
    return sum(
        value.numel() * value.element_size()
        for per_param in state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor) and value.ndim > 0
    )


def save_checkpoint(engine: DeepSpeedEngine, state: TrainState, metrics: dict[str, Any], settings: dict[str, Any]) -> None:
    """Every rank writes its part of the engine state and reports it; Ray merges them into one directory.

    Rank 0 adds the run's `settings` (`uhr.train.resume.resume_settings`), which a resume must keep.
    """
    with tempfile.TemporaryDirectory(prefix="uhr-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"uhr": asdict(state)})
        if dist.get_rank() == 0:
            (Path(directory) / RESUME_FILE).write_text(json.dumps(settings))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint-{state.step:08d}",
        )


def restore_checkpoint(
    engine: DeepSpeedEngine,
    checkpoint: ray.train.Checkpoint,
    config: FinetuneConfig,
    written: dict[str, Any],
    tag: str = CHECKPOINT_TAG,
) -> TrainState:
    """Load the engine (weights, optimizer state, schedule) and the loop state from `checkpoint`'s `tag`.

    `written` holds the settings the checkpoint was written under (`checkpoint_settings`). It may
    have been another number of workers or micro-batch size (loading from the universal form,
    `uhr.train.universal`): the interrupted epoch's position is the samples all workers had read,
    re-counted in this run's micro-batches per worker (rounded down, so no row is passed over
    untrained). A checkpoint that predates `epoch_batches` is placed by its steps.
    """
    with checkpoint.as_directory() as directory:
        path, client_state = engine.load_checkpoint(directory, tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed state under tag {tag!r}")
    saved = client_state["uhr"]
    epoch_start = saved.get("epoch_start", saved["step"])
    workers, micro = dist.get_world_size(), config.micro_batch_size
    workers_then, micro_then = written.get("scaling.num_workers", workers), written.get("micro_batch_size", micro)
    epoch_batches = saved.get("epoch_batches", (saved["step"] - epoch_start) * config.batch_size // (micro_then * workers_then))
    return TrainState(
        step=saved["step"],
        epoch=saved["epoch"],
        epoch_start=epoch_start,
        epoch_batches=epoch_batches * micro_then * workers_then // (micro * workers),
        history=[tuple(item) for item in saved["history"]],
        resumed_from=[*saved["resumed_from"], saved["step"]],
        grounding=[tuple(item) for item in saved.get("grounding", [])],
    )


# ----------------------------------------------------------------------------------------------
# Steps and epochs
# ----------------------------------------------------------------------------------------------


Batch = TypeVar("Batch")


class StepCounter:
    """Counts a worker's micro-batches into optimizer steps and epochs, on a `TrainState`.

    An epoch's last micro-batches that fill no optimizer step join the next epoch's first one
    (the loop holds them until the step is full), so the micro-batches an epoch
    had read at a step are counted, not derived from its steps: a run resumed from any checkpoint
    then trains the micro-batches the uninterrupted run would have.
    """

    def __init__(self, state: TrainState, accumulation: int):
        self.state = state
        self.accumulation = accumulation
        self._pending = 0  # micro-batches trained since the last optimizer step (DeepSpeed's count too)
        self._read = 0  # micro-batches of the current epoch read so far

    def epoch(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The current epoch's micro-batches left to train: those it had read at the checkpoint are read past."""
        skip, self._read = self.state.epoch_batches, 0
        for batch in batches:
            self._read += 1
            if self._read > skip:
                yield batch

    def trained(self) -> bool:
        """Count one trained micro-batch; True when it completed an optimizer step (`state.step` advanced)."""
        self._pending += 1
        if self._pending < self.accumulation:
            return False
        self._pending = 0
        self.state.step += 1
        self.state.epoch_batches = self._read
        return True

    def next_epoch(self) -> None:
        """Begin the next epoch (its first step may still hold micro-batches of this one)."""
        self.state.epoch += 1
        self.state.epoch_start = self.state.step
        self.state.epoch_batches = 0


# ----------------------------------------------------------------------------------------------
# One micro-step
# ----------------------------------------------------------------------------------------------


def select_tokens(
    model: UhrForConditionalGeneration, strategy: PruningStrategy, sample: dict[str, Any], config: FinetuneConfig
) -> list[PrunedTokens]:
    """The pruned visual tokens of each of a sample's images (one for most samples), in placeholder
    order, with gradients through the kept and merged features."""
    selections = []
    for image in [sample, *(sample.get("extra_images") or [])]:
        with PreparedSource(image, config.storage, config.normalize) as source:
            encoding = strategy.encode(model, source)
            selections.append(strategy.select(model, encoding, sample["question"]))
    return selections


def label_tokens(samples: list[dict[str, Any]]) -> int:
    """Label positions a causal LM's loss counts in `samples`: those not IGNORE_INDEX after each
    sample's first (the loss predicts each token from the ones before it)."""
    return sum(sum(1 for label in sample["labels"][1:] if label != IGNORE_INDEX) for sample in samples)


def micro_step(
    engine: DeepSpeedEngine, strategy: PruningStrategy, samples: list[dict[str, Any]], config: FinetuneConfig, step_tokens: int
) -> tuple[float, float | None, int]:
    """Forward, backward and (at accumulation boundaries) an optimizer step.

    The LM loss is a mean per label token over the whole optimizer step: this micro-batch's summed
    token losses divided by `step_tokens`, the label tokens of all the step's micro-batches on all
    ranks (`num_items_in_batch`, as transformers' Trainer does). A step's gradient then does not depend
    on how its samples are split into micro-batches and ranks, and a long answer weighs by its tokens.
    DeepSpeed divides what `backward` gets by the accumulation steps and averages gradients over the
    ranks, so the loss is scaled up by both first. The grounding term (times its weight) stays a mean
    over the step's micro-batches and ranks.

    Returns (this micro-batch's share of the step's objective, the shares of all its micro-batches and
    ranks adding up to it; the grounding loss, or None when off or no sample has evidence; visual tokens).
    """
    model: UhrForConditionalGeneration = engine.module
    visual = [select_tokens(model, strategy, sample, config) for sample in samples]
    batch = {key: value.to(engine.device) for key, value in collate(samples, model.tokenizer.pad_token_id).items()}
    replicas = engine.gradient_accumulation_steps() * dist.get_world_size()
    share = engine(**batch, visual=visual, num_items_in_batch=max(step_tokens, 1)).loss
    grounding = None
    if config.grounding.weight > 0:
        grounding = grounding_loss(model, batch, visual, [sample.get("bbox") for sample in samples], config.grounding.layer)
        if grounding is not None:
            share = share + config.grounding.weight * grounding / replicas
    engine.backward(share * replicas)
    engine.step()
    return float(share.detach()), None if grounding is None else float(grounding.detach()), sum(len(t) for row in visual for t in row)


def _sum_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def _pooled_mean(values: list[float], device: torch.device) -> float | None:
    """Mean of every rank's `values` together (a rank may have none); None when no rank has any."""
    totals = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else None


def _steady_rate(samples: int, busy_s: float, first_step: tuple[int, float] | None) -> float | None:
    """Samples/s after the first optimizer step; None when this process ran fewer than two steps."""
    if first_step is None or samples == first_step[0]:
        return None
    return (samples - first_step[0]) / (busy_s - first_step[1])


def _gather(value: Any) -> list[Any]:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, TrainPlan]) -> dict[str, Any]:
    """Train until `plan.total_steps` optimizer steps (or `epochs` passes), checkpointing on the way.

    Returns (on rank 0, as `Result.return_value`) the run's loss history, resume points, and per
    rank its node, the optimizer-state bytes, samples trained and samples/s (overall, and after the
    process's first optimizer step).
    """
    workers = ray.train.get_context().get_world_size()
    # An elastic group may be smaller than configured: its batch arithmetic is this size's.
    config = loop_config["plan"].config.for_workers(workers)
    deepspeed_config = fill_deepspeed_config(loop_config["plan"].deepspeed_config, config)
    plan = replace(loop_config["plan"], config=config, deepspeed_config=deepspeed_config)
    checkpoint = ray.train.get_checkpoint()
    written = {} if checkpoint is None else checkpoint_settings(checkpoint)
    written_by = written.get("scaling.num_workers")
    universal = written_by not in (None, workers)
    if universal:  # a checkpoint of another group size loads from its universal form
        if dist.get_rank() == 0:
            convert_to_universal(join_uri(config.output, config.name, posixpath.basename(checkpoint.path)), config.storage)
        dist.barrier()
    engine, model = build_engine(plan, load_universal=universal)
    strategy = build_strategy(config.pruning)
    state = TrainState()
    accumulation = config.gradient_accumulation_steps
    if checkpoint is not None:
        state = restore_checkpoint(engine, checkpoint, config, written, tag=UNIVERSAL_TAG if universal else CHECKPOINT_TAG)
        logger.info("resumed from step %d (epoch %d)%s", state.step, state.epoch, f", written by {written_by} workers" if universal else "")
    shard = ray.train.get_dataset_shard("train")
    steps = StepCounter(state, accumulation)
    group_names = [group["name"] for group in engine.optimizer.param_groups]
    settings = resume_settings(config, zero_stage(deepspeed_config))

    samples_seen, busy_s, tokens = 0, 0.0, 0
    # (samples, busy seconds) at the end of this process's first optimizer step, which also waits for
    # Ray Data's first batch and torch's lazy set-up: the steady rate is measured after it.
    first_step: tuple[int, float] | None = None
    step_shares: list[float] = []
    step_grounding: list[float] = []
    # The micro-batches of the step being filled: the step's label tokens are counted before any of
    # them trains. An epoch's last micro-batches that fill no step wait here for the next epoch's first.
    pending: list[list[dict[str, Any]]] = []
    last_saved = state.step
    while state.step < plan.total_steps and (config.max_steps is not None or state.epoch < config.epochs):
        batches = shard.iter_batches(
            batch_size=config.micro_batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.seed + state.epoch,
        )
        started = time.perf_counter()
        for batch in steps.epoch(batches):
            pending.append(batch.to_pylist())
            if len(pending) < accumulation:
                continue
            step_tokens = int(_sum_over_ranks(sum(label_tokens(samples) for samples in pending), engine.device))
            for samples in pending:
                share, grounding, kept = micro_step(engine, strategy, samples, config, step_tokens)
                samples_seen += len(samples)
                tokens += kept
                step_shares.append(share)
                if grounding is not None:
                    step_grounding.append(grounding)
                steps.trained()  # the last of them completes the optimizer step
            pending = []
            loss = _sum_over_ranks(sum(step_shares), engine.device)
            grounding = _pooled_mean(step_grounding, engine.device) if config.grounding.weight > 0 else None
            step_shares, step_grounding = [], []
            state.history.append((state.step, loss))
            if grounding is not None:
                state.grounding.append((state.step, grounding))
            busy_s += time.perf_counter() - started
            if first_step is None:
                first_step = (samples_seen, busy_s)
            final = state.step == plan.total_steps
            if state.step % config.log_every_steps == 0 or state.step % config.checkpoint_every_steps == 0 or final:
                metrics = {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": loss,
                    **({} if grounding is None else {"grounding_loss": grounding}),
                    "visual_tokens_per_sample": tokens / max(samples_seen, 1),
                    **{f"lr/{name}": lr for name, lr in zip(group_names, engine.get_lr())},
                }
                if state.step % config.checkpoint_every_steps == 0 or final:
                    save_checkpoint(engine, state, metrics, settings)
                    last_saved = state.step
                else:
                    ray.train.report(metrics)
            started = time.perf_counter()
            if final:
                break
        else:
            busy_s += time.perf_counter() - started
        if state.step == state.epoch_start:
            raise RuntimeError(
                f"epoch {state.epoch} gave this worker no full optimizer step ({config.batch_size} samples over "
                f"{dist.get_world_size()} workers): too few usable samples in the manifest"
            )
        if state.step >= plan.total_steps or (config.max_steps is None and state.epoch + 1 >= config.epochs):
            break  # the state keeps the last epoch trained, as the summary reports it
        steps.next_epoch()
    if last_saved != state.step:  # the epochs ran out before total_steps (skipped samples)
        save_checkpoint(engine, state, {"step": state.step, "epoch": state.epoch, "loss": state.history[-1][1]}, settings)

    per_rank = {
        "nodes": _gather(ray.get_runtime_context().get_node_id()),
        "optimizer_state_bytes": _gather(optimizer_state_bytes(engine)),
        "samples": _gather(samples_seen),
        "samples_per_s": _gather(samples_seen / busy_s if busy_s else 0.0),
        "steady_samples_per_s": _gather(_steady_rate(samples_seen, busy_s, first_step)),
    }
    return {
        "steps": state.step,
        "epochs": state.epoch,
        "history": state.history,
        "grounding": state.grounding,
        "resumed_from": state.resumed_from,
        **per_rank,
    }


__all__ = [
    "MODEL_PARTS",
    "StepCounter",
    "TrainPlan",
    "TrainState",
    "build_engine",
    "inner_optimizer",
    "micro_step",
    "model_part",
    "optimizer_state_bytes",
    "parameter_groups",
    "restore_checkpoint",
    "save_checkpoint",
    "select_tokens",
    "train_loop_per_worker",
]
