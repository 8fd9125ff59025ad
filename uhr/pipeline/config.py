"""Typed configuration of the archive-wide VQA job (values live in `configs/vqa/*.yaml`)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from uhr.model.pruning.config import PruningConfig
from uhr.scenes.listing import DEFAULT_SCENE_PATTERNS
from uhr.scenes.normalize import NormalizeConfig
from uhr.storage import StorageConfig


class Precision(str, Enum):
    FP32 = "float32"
    BF16 = "bfloat16"
    FP16 = "float16"


class ReadStageConfig(BaseModel):
    """CPU tasks that open scenes and read their coarse views."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each read task (GDAL decodes on them).")
    concurrency: int | None = Field(
        None, ge=1, description="Most read tasks at once; None lets Ray Data decide. Bound it for object stores that throttle."
    )
    memory_gb: float = Field(
        1.5,
        gt=0,
        description="Memory reserved per read task, GiB: the views of a scene at the largest scale plus GDAL's block cache "
        "(a uhr-bat read of an 8192^2 scene peaks near 0.9 GiB, worker included). "
        "A reservation of its own also keeps Ray Data from fusing the reads into the encode actors.",
    )
    window_num_cpus: float = Field(
        0.25, gt=0, description="CPUs reserved by each task that reads the fine windows a strategy asks for (c2f)."
    )
    windows_per_task: int = Field(4, ge=1, description="Fine windows read by one task (one scene open serves them all).")


class ActorStageConfig(BaseModel):
    """An accelerator actor pool: `ActorPoolStrategy(min_size, max_size)` with resources per actor."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_actors: int = Field(1, ge=1, description="Actors kept alive (Ray Data pools cannot scale to zero).")
    max_actors: int = Field(1, ge=1, description="Most actors the pool grows to when work queues up.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; 0 runs on CPU. Fractions pack several actors on one GPU.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor.")
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type the actors need (e.g. 'A10G', 'H100'): keeps the autoscaler from packing "
        "many small actors onto one large, costly GPU node. None: any GPU.",
    )
    batch_size: int = Field(1, ge=1, description="Rows per call: scenes for the encode stage, questions for the answer stage.")
    max_tasks_in_flight: int = Field(2, ge=1, description="Batches queued per actor, so the next one is ready when a call returns.")

    @model_validator(mode="after")
    def _check_sizes(self) -> ActorStageConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors={self.min_actors} is larger than max_actors={self.max_actors}")
        return self


class VqaConfig(BaseModel):
    """Everything `python -m jobs.vqa` needs. Every field can be set in YAML or as `key=value`.

    Relative local paths are made absolute against the driver's working directory before workers
    see them.
    """

    # Inputs stay out of validation errors: a rejected value may be a presigned URI or a secret.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    model: str | None = Field(
        None, description="Model directory or object-store URI (our export, LLaVA-NeXT or LongVA/GeoLLaVA-8K); None: the default model."
    )
    scenes: str | None = Field(
        None,
        description="Scene prefix (local dir or s3://...) or a .txt/.lst file listing scene URIs, one a line. Relative "
        "scene names (a list's lines, or with `questions` the table's `scene` column) resolve against the prefix, or "
        "against the list file's folder.",
    )
    scene_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCENE_PATTERNS),
        min_length=1,
        description="File-name globs (case-insensitive) a `scenes` prefix is listed with, e.g. ['*_AnalyticMS_SR*.tif'] "
        "to leave a delivery's browse images and usable-data masks out.",
    )
    questions: str | None = Field(
        None, description="Questions table (Parquet, JSONL or CSV: question_id, scene, question, optional choices, bbox, prompt, extra_scenes)."
    )
    ask: list[str] = Field(
        default_factory=list,
        description="Questions asked of every scene (instead of `questions`); a text or scene given twice is asked once.",
    )
    output: str = Field(
        "outputs/vqa",
        description="Output dataset URI (local or s3://). Re-running on it resumes: questions with a row are skipped, "
        "those whose row is an error are asked again (the error row is replaced).",
    )
    overwrite: bool = Field(False, description="Delete what `output` holds and start afresh.")
    pruning: PruningConfig = Field(default_factory=PruningConfig, description="Strategy and token budget.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-store endpoint and GDAL tuning.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="Bands, stretch and nodata handling of scenes.")
    read: ReadStageConfig = Field(default_factory=ReadStageConfig, description="Scene read stage (CPU tasks).")
    encode: ActorStageConfig = Field(default_factory=ActorStageConfig, description="Encode + prune actor pool (answers too when fused).")
    answer: ActorStageConfig = Field(
        default_factory=lambda: ActorStageConfig(batch_size=8), description="Answer actor pool (used when `fused` is false)."
    )
    fused: bool = Field(
        True,
        description="Encode, prune and answer in one actor per accelerator (Ray Data does not overlap two GPU stages); "
        "false splits answering into its own pool.",
    )
    precision: Precision = Field(Precision.FP32, description="Model weights and activations (bfloat16 on GPUs).")
    max_new_tokens: int = Field(64, ge=1, description="Greedy generation limit per answer (XLRS uses 64).")
    rows_per_file: int = Field(
        50_000, ge=1, description="Answer rows per output Parquet file: fewer, larger parts keep listing and resuming cheap."
    )
    flush_interval_s: float = Field(
        60.0,
        gt=0,
        description="Write buffered rows once they have waited this long (checked every second), so a killed driver "
        "loses little; an exception or Ctrl-C writes them on the way out.",
    )
    status_interval_s: float = Field(10.0, gt=0, description="Seconds between one-line status reports.")
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Identifier of this run, in part names and rows (letters, digits, '.', '_', '-'); None: generated "
        "from the time. A fixed id may be reused: each run numbers its parts on from those already there.",
    )
