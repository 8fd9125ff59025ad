"""Typed configuration of the fine-tuning job (values live in `configs/train/*.yaml`).

Defaults follow the published recipes where they agree (UHR-BAT, seed 004 appendix B: global batch
16, 2 epochs, ZeRO-2, lr 1e-5 for the visual side and 5e-5 for the projection layers that feed the
LM; its figure 2 keeps the ViT frozen). GeoLLaVA-8K's release adds CPU optimizer offload
(`deepspeed.offload_optimizer`) and trains the tower at 1e-6 and the LM at 5e-6.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.config import Precision
from uhr.scenes.normalize import NormalizeConfig
from uhr.storage import StorageConfig, join_uri


class PlacementStrategy(str, Enum):
    """Ray placement-group strategies for the training workers."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class PartConfig(BaseModel):
    """Whether one part of the model trains, and at which peak learning rate."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    train: bool = Field(True, description="False freezes the part (no gradients, no optimizer state).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of the part (after warmup, before cosine decay).")


class OptimizerConfig(BaseModel):
    """AdamW with per-part learning rates, cosine decay after a linear warmup."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vision_tower: PartConfig = Field(
        default_factory=lambda: PartConfig(train=False, lr=1e-5),
        description="The CLIP tower (frozen by default, as in UHR-BAT's figure 2).",
    )
    projector: PartConfig = Field(
        default_factory=lambda: PartConfig(train=True, lr=5e-5),
        description="Projector, image newline, UHR-BAT scale embeddings and GeoLLaVA-8K affinity head: "
        "the layers that feed the LM.",
    )
    language_model: PartConfig = Field(
        default_factory=lambda: PartConfig(train=True, lr=1e-5), description="The causal LM, embeddings and head included."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (LLaVA recipes use 0).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment decay rates.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming up linearly from 0.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clipping threshold.")

    @model_validator(mode="after")
    def _check_something_trains(self) -> OptimizerConfig:
        if not (self.vision_tower.train or self.projector.train or self.language_model.train):
            raise ValueError("every part is frozen: set train=true on at least one of vision_tower, projector, language_model")
        return self


class DataConfig(BaseModel):
    """LLaVA conversation manifests and the CPU preprocessing that feeds the workers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    manifest: str | None = Field(
        None,
        description="Manifest URI (local or s3://): JSON (a list of records) or JSONL (one per line), records "
        "{id, image, conversations}. None: the synthetic training split, made once in the uhr cache directory.",
    )
    image_root: str | None = Field(
        None, description="Prefix relative `image` paths resolve against; None: the manifest's directory."
    )
    max_length: int = Field(
        2048, ge=8, description="Most text tokens per sample (the image placeholder counts as one); longer ones are cut."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per preprocessing task (scene reads, tokenisation).")
    concurrency: int | None = Field(None, ge=1, description="Most preprocessing tasks at once; None lets Ray Data decide.")
    shuffle_buffer: int = Field(
        64, ge=0, description="Rows in each worker's local shuffle buffer (0: manifest order as Ray Data streams it)."
    )


class ScalingSettings(BaseModel):
    """How many training workers, and what each one holds (`ray.train.ScalingConfig`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_workers: int = Field(2, ge=1, description="Training workers (data-parallel ranks); with min_workers, the most.")
    min_workers: int | None = Field(
        None,
        ge=1,
        description="Elastic training (ZeRO-1/2): the worker group starts with as few as this many when num_workers cannot "
        "all be placed, is restarted smaller when a node is lost, and grows back towards num_workers as nodes come "
        "(Ray Train's elastic ScalingConfig), each time from the latest checkpoint. None: exactly num_workers.",
    )
    resize_interval_s: float = Field(
        60.0, gt=0, description="With min_workers: seconds between Ray Train's checks for room to grow the group."
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL and bf16; False trains on CPUs over gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Extra (custom) resources each worker needs, e.g. {'trainer_slot': 1} to pin workers to node types.",
    )
    placement_strategy: PlacementStrategy = Field(
        PlacementStrategy.PACK, description="PACK fills nodes first; STRICT_SPREAD puts every worker on its own node."
    )


class DeepSpeedSettings(BaseModel):
    """The DeepSpeed JSON and the switches that fill its "auto" fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    config: str = Field(
        "configs/train/zero2.json",
        description="DeepSpeed JSON, relative to the working directory or else the project root; its \"auto\" fields are "
        "filled from this config.",
    )
    zero_stage: int | None = Field(
        None, ge=0, le=2, description="ZeRO stage to use instead of the JSON's (0 replicates the optimizer state)."
    )
    offload_optimizer: bool = Field(
        False, description="Keep the optimizer state in CPU memory (GeoLLaVA-8K's setting); needs ZeRO stage >= 1."
    )
    precision: Precision | None = Field(
        None, description="Training precision: float32 or bfloat16; None: bfloat16 on GPUs, float32 on CPUs."
    )


class GroundingConfig(BaseModel):
    """Attention supervision (`uhr.train.grounding`); off by default, as the papers' recipes have none."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    weight: float = Field(0.0, ge=0, description="Weight of the grounding loss beside the answer loss; 0 turns it off.")
    layer: int | None = Field(
        None, description="Decoder layer whose attention is trained; None: the middle layer, where c2f and uhr-bat score."
    )


class FinetuneConfig(BaseModel):
    """Everything `python -m jobs.finetune` needs. Every field can be set in YAML or as `key=value`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(
        None, description="Model to start from: directory or object-store URI (our export, LLaVA-NeXT, LongVA); None: the default model."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Manifest and preprocessing.")
    pruning: PruningConfig = Field(
        default_factory=PruningConfig,
        description="Strategy in the loop and its token budget; unset fields come from the model's pruning defaults.",
    )
    grounding: GroundingConfig = Field(
        default_factory=GroundingConfig, description="Loss that points the LM's attention at records' evidence `bbox`."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-store endpoint and GDAL tuning.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="Bands, stretch and nodata handling of scenes.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Per-part learning rates and freezing, schedule.")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="Workers and their resources.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="ZeRO stage, offload, precision.")
    batch_size: int = Field(16, ge=1, description="Global batch: samples per optimizer step over all workers.")
    micro_batch_size: int = Field(1, ge=1, description="Samples per worker per forward/backward; the rest is accumulation.")
    epochs: int = Field(2, ge=1, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train for, however many epochs that takes.")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute layer activations in the backward pass (transformers' activation_checkpointing_enable, "
        "the v5 name of gradient checkpointing): less memory, about a third more compute.",
    )
    output: str = Field("outputs/finetune", description="Run storage (local or s3://): checkpoints under <output>/<name>/.")
    name: str = Field("finetune", min_length=1, description="Run name; re-running with the same output and name resumes.")
    export: str | None = Field(None, description="Where the final model is exported; None: <output>/<name>/export.")
    overwrite: bool = Field(False, description="Delete the run's checkpoints and export and start afresh.")
    checkpoint_every_steps: int = Field(50, ge=1, description="Optimizer steps between checkpoints (the last step is always saved).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept in storage.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts (from the last checkpoint) before the run fails.")
    log_every_steps: int = Field(1, ge=1, description="Optimizer steps between reported metrics.")
    seed: int = Field(0, ge=0, description="Seed of the model's random parts and of shuffling.")

    @model_validator(mode="after")
    def _check_batch(self) -> FinetuneConfig:
        if self.scaling.min_workers is not None and self.scaling.min_workers > self.scaling.num_workers:
            raise ValueError(f"scaling.min_workers={self.scaling.min_workers} exceeds scaling.num_workers={self.scaling.num_workers}")
        # The global batch stays whatever size the group: every size it may take must divide it.
        for workers in self.worker_counts:
            if self.batch_size % (self.micro_batch_size * workers):
                raise ValueError(
                    f"batch_size={self.batch_size} is not a multiple of micro_batch_size x num_workers = "
                    f"{self.micro_batch_size} x {workers}"
                    + (" (every group size from scaling.min_workers to num_workers must divide it)" if self.elastic else "")
                )
        if self.deepspeed.precision not in (None, Precision.FP32, Precision.BF16):
            raise ValueError(f"deepspeed.precision must be float32 or bfloat16, got {self.deepspeed.precision.value}")
        if self.deepspeed.precision == Precision.BF16 and not self.scaling.use_gpu:
            raise ValueError("bfloat16 training needs GPUs (scaling.use_gpu=true); CPU runs train in float32")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO stage 1 or 2, got zero_stage=0")
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches each worker accumulates per optimizer step (in a group of `scaling.num_workers`)."""
        return self.batch_size // (self.micro_batch_size * self.scaling.num_workers)

    @property
    def elastic(self) -> bool:
        """Whether the worker group may run at another size than `scaling.num_workers` (`scaling.min_workers`)."""
        return self.scaling.min_workers is not None and self.scaling.min_workers < self.scaling.num_workers

    @property
    def worker_counts(self) -> range:
        """Every size the worker group may take."""
        return range(self.scaling.min_workers if self.elastic else self.scaling.num_workers, self.scaling.num_workers + 1)

    def for_workers(self, workers: int) -> FinetuneConfig:
        """This config as a group of `workers` runs it: its batch arithmetic and what its checkpoints record."""
        if workers not in self.worker_counts:
            raise ValueError(f"a group of {workers} workers is outside scaling's {list(self.worker_counts)}")
        return self.model_copy(update={"scaling": self.scaling.model_copy(update={"num_workers": workers, "min_workers": None})})

    @property
    def precision(self) -> Precision:
        """The training precision actually used."""
        if self.deepspeed.precision is not None:
            return self.deepspeed.precision
        return Precision.BF16 if self.scaling.use_gpu else Precision.FP32

    @property
    def export_uri(self) -> str:
        """Where the final export goes."""
        return self.export or join_uri(self.output, self.name, "export")
