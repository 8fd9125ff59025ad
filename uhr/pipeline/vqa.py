"""The archive-wide VQA job: plan on the driver, stream scenes through Ray Data, write answer rows.

`build_vqa_dataset` appends the stages in DESIGN order (read -> encode + prune [+ answer] ->
[answer]), each switched by the config; `run_vqa` plans, runs and writes, resuming what an earlier
run on the same output left undone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.annotations import RayDeprecationWarning

from uhr.model import load_model_config, weights_fingerprint
from uhr.answers import same_choice
from uhr.config import merge_trees
from uhr.model.config import UhrConfig
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.config import VqaConfig
from uhr.pipeline.defaults import default_model, sample_archive
from uhr.pipeline.output import ResultWriter, RunManifest, clear_output, drop_rows, read_done
from uhr.pipeline.plan import (
    InputError,
    Plan,
    choice_references,
    load_questions,
    make_plan,
    questions_from_ask,
    scene_uris,
)
from uhr.pipeline.stages import AnswerStage, EncodeStage, read_scenes
from uhr.storage import CREDENTIAL_ENV_VARS, StorageConfig, absolute_uri, redact

logger = logging.getLogger(__name__)


def resolve_pruning(pruning: PruningConfig, model_config: UhrConfig) -> PruningConfig:
    """The model's pruning defaults (e.g. GeoLLaVA-8K's clusters per tile), under what the user set."""
    merged = merge_trees(model_config.pruning_defaults or {}, pruning.model_dump(mode="json", exclude_unset=True))
    return PruningConfig.model_validate(merged)


def worker_env(storage: StorageConfig) -> dict[str, Any]:
    """The runtime environment of every stage: GDAL tuning, endpoint, region, block cache.

    Credentials are left out on purpose: a runtime environment is recorded in the cluster's job
    metadata. Workers find credentials where the AWS SDKs and GDAL look (node environment, instance
    or pod identity), as in any production Ray cluster.
    """
    env = {k: v for k, v in storage.worker_env_vars().items() if k not in CREDENTIAL_ENV_VARS}
    return {"env_vars": env}


ACTOR_TASK_RETRIES = 3
"""Attempts of a batch after its actor died: enough for a lost node; a scene whose batch kills
its actor every time (out of memory) stops the job instead of being retried forever (Ray Data's
default), its rows so far written and a rerun resuming."""


@contextmanager
def _retries_through_remote_args() -> Iterator[None]:
    """Ray 2.60's `map_batches` names no parameter for `max_task_retries`: `ray_remote_args`, which
    it warns is deprecated (for removal in Ray 2.64), is the only way in, so that warning is silenced
    where the actor stages take it; nothing a user could act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        yield


def required_cpus(config: VqaConfig) -> float:
    """CPUs a local Ray needs for this job to make progress: the actor pools' minimum actors hold
    theirs for their lifetime, so a read task needs one beside them (a window read an actor waits
    for then takes a read task's CPU when it ends)."""
    encode, answer = config.encode, config.answer
    actors = encode.min_actors * encode.num_cpus + (0 if config.fused else answer.min_actors * answer.num_cpus)
    return actors + config.read.num_cpus


MAX_INPUT_BLOCKS = 4096
"""Blocks the scene groups are cut into. Up to this many groups, each is a block of its own, so
each read task reads one scene; beyond it groups share blocks, because the driver puts every block
into the object store one by one (about 1.6 ms each: 26 minutes for a million scenes)."""


def unseen_rows(batch: pa.Table, written: set[str]) -> pa.Table:
    """The rows of `batch` whose question is not in `written` yet, the first of any repeated within
    it; their ids are added to `written`."""
    fresh = []
    for index, qid in enumerate(batch["question_id"].to_pylist()):
        if qid not in written:
            written.add(qid)
            fresh.append(index)
    return batch if len(fresh) == batch.num_rows else batch.take(pa.array(fresh, pa.int64()))


def input_dataset(groups: pa.Table) -> ray.data.Dataset:
    """The plan's scene groups as a dataset of `MAX_INPUT_BLOCKS` blocks at most (one group each
    while there are fewer groups), put into the object store by the driver."""
    bounds = np.linspace(0, groups.num_rows, max(1, min(groups.num_rows, MAX_INPUT_BLOCKS)) + 1).astype(int)
    # from_blocks, not from_arrow: from_arrow runs a Ray task per block to read its metadata (22 s for
    # 4,096 blocks of 225,000 groups on a busy 2-core machine, against 7 s here); Ray is pinned to 2.60.
    return ray.data.from_blocks([groups.slice(start, stop - start) for start, stop in zip(bounds[:-1], bounds[1:])])


def build_vqa_dataset(
    groups: pa.Table, config: VqaConfig, model_uri: str, model_config: UhrConfig, run_id: str
) -> ray.data.Dataset:
    """The lazy pipeline over scene groups: read (CPU tasks) -> encode + prune [+ answer] -> [answer]."""
    runtime_env = worker_env(config.storage)
    read, encode, answer = config.read, config.encode, config.answer
    stage_kwargs = {"config": config, "model_uri": model_uri, "run_id": run_id, "model_id": redact(model_uri)}
    ds = input_dataset(groups)
    # Ray Data spreads its tasks over the nodes itself (DataContext.scheduling_strategy, SPREAD by
    # default): scene reads fan out without a strategy of ours.
    ds = ds.map_batches(
        read_scenes,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "model_config": model_config,
            "pruning": config.pruning,
            "storage": config.storage,
            "normalize": config.normalize,
        },
        concurrency=read.concurrency,
        runtime_env=runtime_env,
        num_cpus=read.num_cpus,
        memory=read.memory_gb * 2**30,
    )
    with _retries_through_remote_args():
        ds = ds.map_batches(
            EncodeStage,
            fn_constructor_kwargs={**stage_kwargs, "fused": config.fused},
            batch_size=encode.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=encode.min_actors, max_size=encode.max_actors, max_tasks_in_flight_per_actor=encode.max_tasks_in_flight
            ),
            num_gpus=encode.num_gpus,
            num_cpus=encode.num_cpus,
            accelerator_type=encode.accelerator_type,
            runtime_env=runtime_env,
            max_task_retries=ACTOR_TASK_RETRIES,
        )
        if not config.fused:
            ds = ds.map_batches(
                AnswerStage,
                fn_constructor_kwargs=stage_kwargs,
                batch_size=answer.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(
                    min_size=answer.min_actors,
                    max_size=answer.max_actors,
                    max_tasks_in_flight_per_actor=answer.max_tasks_in_flight,
                ),
                num_gpus=answer.num_gpus,
                num_cpus=answer.num_cpus,
                accelerator_type=answer.accelerator_type,
                runtime_env=runtime_env,
                max_task_retries=ACTOR_TASK_RETRIES,
            )
    return ds


@dataclass
class RunSummary:
    """What a run did, printed by the job and stored in the manifest."""

    output: str
    run_id: str
    status: str
    total: int
    skipped: int
    rows: int
    answered: int
    errors: int
    scenes: int
    wall_s: float
    mean_tokens_kept: float | None
    mean_tokens_dense: float | None
    # Multiple-choice questions with a reference answer, and how many the chosen letter(s) got right:
    # over every row the output holds for the run's questions, earlier runs' included.
    scored: int = 0
    correct: int = 0
    # Questions whose earlier row was an error or answered from another number of images, asked
    # again by this run (counted in `rows`, not `skipped`).
    retried: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    @property
    def scenes_per_s(self) -> float:
        return self.scenes / self.wall_s if self.wall_s else 0.0

    @property
    def questions_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0

    def format(self) -> str:
        tokens = (
            f"{self.mean_tokens_kept:.1f} kept / {self.mean_tokens_dense:.1f} dense"
            if self.mean_tokens_kept is not None
            else "n/a"
        )
        earlier = ", earlier runs' rows included" if self.skipped else ""
        retried = f" ({self.retried} earlier rows asked again)" if self.retried else ""
        return "\n".join(
            [
                f"run {self.run_id}: {self.status}",
                f"  rows written   {self.rows} ({self.answered} answered, {self.errors} errors); "
                f"{self.skipped} already done{retried}, {self.total} questions in all",
                f"  throughput     {self.scenes_per_s:.3f} scenes/s, {self.questions_per_s:.3f} questions/s "
                f"({self.scenes} scenes in {self.wall_s:.1f} s)",
                f"  visual tokens  {tokens} (mean per answered question)",
                *(
                    [
                        f"  accuracy       {self.accuracy:.1%} ({self.correct}/{self.scored} multiple-choice "
                        f"questions with a reference answer{earlier}; XLRS letter rule)"
                    ]
                    if self.scored
                    else []
                ),
                f"  output         {redact(self.output)}",
            ]
        )


class _Progress:
    """Counts rows as they are written and logs a one-line status every `interval` seconds."""

    def __init__(self, total: int, interval: float, references: dict[str, str]):
        self.total, self.interval, self.references = total, interval, references
        self.rows = self.answered = self.errors = self.scored = self.correct = 0
        self.kept = self.dense = 0
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="uhr-status", daemon=True)

    def add(self, batch: pa.Table) -> None:
        answered = pc.is_valid(batch["answer"])
        self.rows += batch.num_rows
        self.answered += pc.sum(answered).as_py() or 0
        self.errors += pc.sum(pc.is_valid(batch["error"])).as_py() or 0
        self.kept += pc.sum(pc.filter(batch["tokens_kept"], answered)).as_py() or 0
        self.dense += pc.sum(pc.filter(batch["tokens_dense"], answered)).as_py() or 0
        self.score(batch)

    def score(self, rows: pa.Table) -> None:
        """Count `rows`' choices against the references (the job's rows, or those an earlier run wrote)."""
        for qid, choice in zip(rows["question_id"].to_pylist(), rows["choice"].to_pylist()):
            reference = self.references.get(qid)
            if reference is not None:
                self.scored += 1
                self.correct += choice is not None and same_choice(choice, reference)

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.rows / elapsed if elapsed else 0.0
        return f"[uhr] {self.rows}/{self.total} rows ({self.answered} answered, {self.errors} errors), {elapsed:.0f} s, {rate:.2f} questions/s"

    def _report(self) -> None:
        while not self._stop.wait(self.interval):
            logger.info(self.line())

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        logger.info(self.line())


def _versions() -> dict[str, str]:
    import rasterio
    import torch
    import transformers

    from importlib.metadata import version

    return {
        "uhr": version("uhr"),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "python": platform.python_version(),
    }


def _questions(config: VqaConfig) -> tuple[pa.Table, str | None]:
    """The questions of the run and the prefix relative scene names resolve against."""
    storage = config.storage
    if config.questions is not None and config.ask:
        raise InputError("give either `questions` or `ask`, not both")
    if config.questions is None and not config.ask:
        if config.scenes is not None:
            raise InputError("`scenes` needs questions: give `questions` (a table) or `ask` (repeatable text)")
        archive = sample_archive()
        return load_questions(archive.questions_parquet, storage), archive.root
    if config.questions is not None:
        return load_questions(config.questions, storage), config.scenes
    if config.scenes is None:
        raise InputError("`ask` needs `scenes`: a prefix or a file listing scene URIs")
    return questions_from_ask(scene_uris(config.scenes, storage, config.scene_patterns), config.ask), None


def connect_ray(min_cpus: float = 0) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local Ray.

    A local Ray gets at least `min_cpus` logical CPUs, more than the machine has if need be: a job
    whose tasks and actors need them all at once (training workers beside their data stage) would
    otherwise never schedule on a small machine.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    num_cpus = math.ceil(min_cpus) if min_cpus > (os.cpu_count() or 1) else None
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)


def answer_settings(config: VqaConfig, model_config: UhrConfig, model_weights: str) -> dict[str, Any]:
    """What decides a run's answers: the model's config (by hash) and weights (`weights_fingerprint`),
    pruning, normalisation, precision, answer length. Rows written under other settings must not be
    mixed into one dataset.

    The model is identified by what it is, not by its URI: a moved checkpoint is the same model, a
    retrained one written over the old is not.
    """
    model_json = json.dumps(_architecture(model_config.to_dict()), sort_keys=True, default=str)
    return {
        # Named apart from the hashes older manifests hold (of the dtype and transformers' version
        # too), which are then not compared.
        "model_config_sha256": hashlib.sha256(model_json.encode()).hexdigest(),
        "model_weights": model_weights,
        "pruning": config.pruning.model_dump(mode="json"),
        "normalize": config.normalize.model_dump(mode="json"),
        "precision": config.precision.value,
        "max_new_tokens": config.max_new_tokens,
    }


_NOT_ARCHITECTURE = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")
"""Config entries that do not decide answers: the weights' storage type, which a load fills in (a
re-saved checkpoint records float32 where its source said nothing; the run's precision and the
weights are settings of their own), the transformers version `to_dict` stamps, where it was loaded from."""


def _architecture(value: Any) -> Any:
    """A config dump without its `_NOT_ARCHITECTURE` entries, at every depth."""
    if isinstance(value, dict):
        return {key: _architecture(item) for key, item in value.items() if key not in _NOT_ARCHITECTURE}
    return value


def _check_resumable(output: str, earlier: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """Refuse to resume `output` when its rows were answered under other settings. What an older
    manifest did not record (all of them, or a setting added since) is trusted."""
    if earlier is None:
        return
    changed = sorted(key for key in settings.keys() & earlier.keys() if not same_setting(settings[key], earlier[key]))
    if not changed:
        return
    raise InputError(
        f"output {redact(output)} holds answers made with other settings ({', '.join(changed)} changed); "
        "resuming would mix them into one dataset: pass --overwrite to start afresh, or choose another --output"
    )


def same_setting(a: Any, b: Any) -> bool:
    """Whether two recorded settings are equal as JSON: a NaN (nodata of float scenes) equals itself."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def redacted_tree(value: Any) -> Any:
    """`value` (a config dump) with every string passed through `redact`: what a manifest may hold."""
    if isinstance(value, dict):
        return {key: redacted_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redacted_tree(item) for item in value]
    return redact(value) if isinstance(value, str) else value


def _absolute_paths(config: VqaConfig) -> VqaConfig:
    """`config` with relative local paths made absolute against the driver's working directory:
    workers (on a cluster started elsewhere) run in other directories."""
    fields = ("scenes", "questions", "model", "output")
    return config.model_copy(update={key: absolute_uri(value) for key in fields if (value := getattr(config, key))})


def _error_ids(done: pa.Table, questions: pa.Table) -> set[str]:
    """Ids of this run's questions whose row in the output is an error (and none answered): a resume
    asks them again. Error rows of questions this run does not ask stay as they are."""
    errors = done.filter(pc.is_valid(done["error"]))["question_id"]
    answered = done.filter(pc.is_null(done["error"]))["question_id"]
    return set(pc.filter(errors, pc.is_in(errors, questions["question_id"])).to_pylist()) - set(answered.to_pylist())


def _stale_ids(done: pa.Table, questions: pa.Table) -> set[str]:
    """Ids of this run's questions answered from another number of images than they now have (a
    multi-image question an older uhr answered from its first image): a resume asks them again."""
    images = {qid: 1 + len(extra or []) for qid, extra in zip(questions["question_id"].to_pylist(), questions["extra_scenes"].to_pylist())}
    answered = done.filter(pc.is_null(done["error"]))
    return {
        qid
        for qid, extra in zip(answered["question_id"].to_pylist(), answered["extra_scenes"].to_pylist())
        if qid in images and images[qid] != 1 + len(extra or [])
    }


def run_vqa(config: VqaConfig) -> RunSummary:
    """Answer every pending question of the run's inputs and write them under `config.output`.

    Inputs are checked before Ray starts (`InputError`, `ConfigError`); re-running on the same
    output skips the questions it already holds, except those whose row is an error or was answered
    from another number of images than the question now has: those rows are taken out of the
    output (`drop_rows`) and their questions asked again, so the output keeps one row per question.
    Rows computed before an interruption are written on the way out.
    """
    storage = config.storage
    run_id = config.run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    given_output = config.output
    config = _absolute_paths(config)
    questions, scenes_prefix = _questions(config)
    model_uri = config.model or default_model()
    model_config = load_model_config(model_uri, storage=storage)
    config = config.model_copy(update={"pruning": resolve_pruning(config.pruning, model_config)})
    if config.overwrite:
        clear_output(config.output, storage)
    done = read_done(config.output, storage)
    failed, stale = _error_ids(done, questions), _stale_ids(done, questions)
    retry = failed | stale

    manifest = RunManifest.load(config.output, storage)
    settings = answer_settings(config, model_config, weights_fingerprint(model_uri, storage=storage))
    if done.num_rows:
        _check_resumable(config.output, manifest.data.get("answer_settings"), settings)
    if retry:
        dropped = drop_rows(config.output, storage, retry)
        logger.info(
            "asking %d questions again: %d had error rows, %d were answered from another number of images (%d rows dropped)",
            len(retry), len(failed), len(stale), dropped,
        )  # fmt: skip
        done = done.filter(pc.invert(pc.is_in(done["question_id"], pa.array(sorted(retry), pa.string()))))
    plan: Plan = make_plan(questions, scenes_prefix, done["question_id"].combine_chunks())
    manifest.data["answer_settings"] = settings
    for earlier in manifest.data["runs"]:
        if earlier.get("status") == "running":
            earlier["status"] = "interrupted"
    entry: dict[str, Any] = {
        "run_id": run_id,
        "started": datetime.now(timezone.utc).isoformat(),
        "status": "running",
        "pending": plan.pending,
        "scenes": plan.scene_reads,
    }
    # Redacted: a presigned questions or model URI carries its signature.
    manifest.data.update(
        config=redacted_tree({**config.model_dump(mode="json"), "model": model_uri, "run_id": run_id}), versions=_versions()
    )
    manifest.data["runs"].append(entry)
    manifest.save()
    logger.info("run %s: %d questions, %d already done, %d scenes to read", run_id, plan.total, plan.done, plan.scene_reads)

    start = time.monotonic()
    progress = _Progress(plan.pending, config.status_interval_s, choice_references(questions))
    progress.score(done)
    del questions, done  # a large table's rows are held by the plan and its blocks from here on
    writer = ResultWriter(config.output, run_id, storage, config.rows_per_file, config.flush_interval_s)
    status = "failed"
    stats = ""
    written: set[str] = set()  # question ids this run wrote
    try:
        # Leaving the writer's context writes what it buffered, also on an exception or Ctrl-C.
        with writer:
            if plan.groups.num_rows:
                connect_ray(min_cpus=required_cpus(config))
                ds = build_vqa_dataset(plan.groups, config, model_uri, model_config, run_id)
                plan = replace(plan, groups=plan.groups.slice(0, 0))  # its blocks hold them now
                # A retried actor task may send rows its dead attempt had already sent (Ray Data skips
                # a retry's blocks by position, and a retry may cut its output differently): each
                # question is written once, and one never sent leaves the run incomplete.
                with progress:
                    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                        batch = unseen_rows(batch, written)
                        writer.write(batch)
                        progress.add(batch)
                stats = ds.stats()
        status = "completed" if len(written) >= plan.pending else "incomplete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        wall = time.monotonic() - start
        summary = RunSummary(
            output=given_output,
            run_id=run_id,
            status=status,
            total=plan.total,
            skipped=plan.done,
            # What reached the output: rows still buffered when writing failed are not counted.
            rows=writer.rows_written,
            answered=progress.answered,
            errors=progress.errors,
            scenes=plan.scene_reads,
            wall_s=wall,
            mean_tokens_kept=progress.kept / progress.answered if progress.answered else None,
            mean_tokens_dense=progress.dense / progress.answered if progress.answered else None,
            scored=progress.scored,
            correct=progress.correct,
            retried=len(retry),
        )
        entry.update(
            {k: v for k, v in asdict(summary).items() if k not in ("output", "run_id")},
            finished=datetime.now(timezone.utc).isoformat(),
            stats=stats,
        )
        rows_total = plan.done + writer.rows_written
        manifest.data["counts"] = {"questions": plan.total, "rows": rows_total, "runs": len(manifest.data["runs"])}
        manifest.data["status"] = "complete" if rows_total >= plan.total and status == "completed" else "incomplete"
        manifest.save()
    return summary
