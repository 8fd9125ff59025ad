"""VQA job benchmark (issue #5): the Ray Data pipeline against S3, next to a naive script.

Against a local S3 API server (`uhr.testing.s3_server.LocalS3Server`, its own process) serving
`scenes` cached synthetic scenes with `questions` questions each:

* per strategy, `run_vqa` as users run it (a local Ray started beforehand, so Ray's own start-up
  is not timed; Ray Data's actor start and model load are): wall time, scenes/s, questions/s,
  bytes read (the rows' `bytes_read`, from GDAL's network counters, and what the server sent) over
  the objects' bytes, and Ray Data's per-operator span and busy time from `ds.stats()` (kept in the
  run's manifest). Stage overlap is read from them: wall time over the slowest operator's span, the
  start-up outside that span, and how busy the slowest operator was within it;
* the naive baseline (`uhr.bench.baseline`) on the same scenes and questions, in this process;
* peak RSS of the Ray worker processes on one large scene (`rss_size`, 32768 px by default), each
  strategy in a fresh Ray so no worker carries an earlier peak (`uhr.bench.rss`).

Each run reads from a fresh bucket: GDAL caches what a worker process downloaded per object, so a
second read of the same object in a reused worker would rightly cost no bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field

from uhr.bench.baseline import NaiveSceneTimes, context_budget, naive_scene
from uhr.bench.inputs import bench_cache_dir, cached_scene, saved_bench_model, scene_questions, strategy_config
from uhr.bench.rss import WorkerMemorySampler, WorkerPeak
from uhr.model import load_model, load_model_config
from uhr.model.pruning import PruningConfig, StrategyName
from uhr.pipeline import MANIFEST_NAME, VqaConfig, run_vqa
from uhr.synth import Question
from uhr.testing.s3_server import LocalS3Server

# Targets from the issue.
SPEEDUP_TARGET = 3.0
"""Pipeline questions/s over the naive baseline's, at least."""
OVERLAP_TARGET = 1.25
"""Pipeline wall time over its slowest stage's time, at most."""
C2F_BYTES_TARGET = 0.35
"""Bytes `c2f` reads over the objects' bytes, at most."""
WORKER_RSS_TARGET = 2 << 30
"""Peak RSS of one Ray worker on the large scene, at most."""

DEFAULT_STRATEGY = PruningConfig().strategy


class VqaBenchConfig(BaseModel):
    """What `python -m jobs.bench_vqa` measures."""

    model_config = ConfigDict(extra="forbid")

    scenes: int = Field(4, ge=1, description="Synthetic scenes in the archive (seeds 0..scenes-1).")
    questions: int = Field(4, ge=1, description="Questions per scene.")
    size: int = Field(8192, gt=0, description="Side of the square scenes, pixels.")
    strategies: list[StrategyName] = Field(
        default_factory=lambda: list(StrategyName), description="Strategies run through `run_vqa`, in this order."
    )
    max_new_tokens: int = Field(
        8, ge=1, description="Tokens generated per answer (the untrained model never stops early)."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray; None: this machine's.")
    baseline: bool = Field(True, description="Run the naive baseline.")
    baseline_side: int = Field(
        4032, gt=0, description="Longest side the naive baseline resizes each scene to before tiling it."
    )
    baseline_text_reserve: int = Field(
        512,
        ge=1,
        description="LM positions the naive baseline leaves for the prompt; its visual tokens fill the rest of the "
        "context.",
    )
    rss_size: int | None = Field(
        32768, gt=0, description="Side of the scene the worker RSS is measured on; None skips it."
    )
    rss_strategies: list[StrategyName] = Field(
        default_factory=lambda: [DEFAULT_STRATEGY, StrategyName.C2F],
        description="Strategies whose worker RSS is measured on the large scene.",
    )
    rss_interval_s: float = Field(0.1, gt=0, description="Seconds between two RSS samples.")
    model_seed: int = Field(0, ge=0, description="Seed of the tiny model's weights.")
    cache_dir: Path = Field(
        default_factory=bench_cache_dir, description="Where scenes and the model are kept between runs."
    )


# ----------------------------------------------------------------------------------------------
# Ray Data's per-operator times, from `ds.stats()`
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorTime:
    """One operator of `ds.stats()`: its wall span (first task start to last task end) and busy time."""

    name: str
    tasks: int
    span_s: float
    busy_s: float
    """Sum of its tasks' remote wall times."""


_OPERATOR = re.compile(
    r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed, \d+ blocks produced in (?P<span>[\d.]+)s$"
)
_REMOTE_WALL = re.compile(r"^\* Remote wall time: .*, (?P<value>[\d.]+)(?P<unit>us|ms|s) total$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_operator_stats(stats: str) -> list[OperatorTime]:
    """The operators of a `ds.stats()` text, in order; raises if none is found (Ray changed its format)."""
    operators: list[OperatorTime] = []
    current: dict | None = None
    for line in stats.splitlines():
        if header := _OPERATOR.match(line.strip()):
            if current is not None:
                operators.append(OperatorTime(**current))
            current = {
                "name": header["name"],
                "tasks": int(header["tasks"]),
                "span_s": float(header["span"]),
                "busy_s": 0.0,
            }
        elif current is not None and (wall := _REMOTE_WALL.match(line.strip())) and current["busy_s"] == 0.0:
            current["busy_s"] = float(wall["value"]) * _UNITS[wall["unit"]]
    if current is not None:
        operators.append(OperatorTime(**current))
    if not operators:
        raise ValueError(f"no operator found in Ray Data's stats; the format may have changed:\n{stats[:500]}")
    return operators


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


@dataclass
class PipelineRun:
    """One `run_vqa` over the archive with one strategy."""

    strategy: str
    budget: int
    wall_s: float
    scenes: int
    rows: int
    errors: int
    bytes_read: int | None
    """Sum of the rows' `bytes_read` (GDAL's counters; a scene's reads split over its questions, each
    share rounded to whole bytes)."""
    server_bytes: int
    """What the S3 server sent during the run."""
    object_bytes: int
    kept: float
    dense: float
    read_s: float
    encode_s: float
    answer_s: float
    """Sums over the rows of their read / encode / answer shares, seconds."""
    operators: list[OperatorTime]

    @property
    def scenes_per_s(self) -> float:
        return self.scenes / self.wall_s

    @property
    def questions_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def slowest(self) -> OperatorTime:
        """The operator with the longest span: the pipeline's bottleneck once it runs."""
        return max(self.operators, key=lambda op: op.span_s)

    @property
    def running_s(self) -> float:
        """The slowest operator's span: the run without its start-up (actor start, model load, first read)."""
        return self.slowest.span_s

    @property
    def startup_s(self) -> float:
        """Wall time outside the slowest operator's span."""
        return self.wall_s - self.running_s

    @property
    def wall_over_slowest(self) -> float:
        return self.wall_s / self.running_s

    @property
    def slowest_busy(self) -> float:
        """Share of its span the slowest operator was working: 1.0 means it never waited for the others."""
        return self.slowest.busy_s / self.running_s

    def scenes_to_amortise(self, target: float) -> int:
        """Scenes after which the start-up leaves wall / slowest span at `target`, at this run's pace."""
        per_scene = self.running_s / self.scenes
        return max(self.scenes, math.ceil(self.startup_s / ((target - 1) * per_scene)))

    @property
    def running_questions_per_s(self) -> float:
        return self.rows / self.running_s

    @property
    def bytes_fraction(self) -> float | None:
        return None if self.bytes_read is None else self.bytes_read / self.object_bytes


@dataclass
class BaselineRun:
    """The naive baseline over the archive."""

    load_s: float
    scenes: list[NaiveSceneTimes]
    questions: int

    @property
    def wall_s(self) -> float:
        return self.load_s + sum(s.total_s for s in self.scenes)

    @property
    def questions_per_s(self) -> float:
        return self.questions / self.wall_s


@dataclass
class RssRun:
    """Worker memory of one strategy on the large scene."""

    strategy: str
    size: int
    wall_s: float
    workers: list[WorkerPeak]
    peak_total: int

    @property
    def peak_worker(self) -> WorkerPeak:
        return max(self.workers, key=lambda w: w.peak_rss)


@dataclass
class VqaBenchResult:
    config: VqaBenchConfig
    object_bytes: int
    runs: list[PipelineRun] = field(default_factory=list)
    baseline: BaselineRun | None = None
    rss: list[RssRun] = field(default_factory=list)


@dataclass(frozen=True)
class _Scene:
    """A cached synthetic scene and the questions asked of it."""

    path: Path
    size: int
    questions: list[Question]

    @staticmethod
    def of(cache: Path, size: int, seed: int, questions: int) -> _Scene:
        path = cached_scene(cache, size, seed)
        return _Scene(path, size, scene_questions(size, seed, questions, path.name))


@dataclass(frozen=True)
class _Archive:
    """Scenes uploaded to one bucket and their questions table."""

    bucket: str
    keys: list[str]
    questions: str
    prompts: dict[str, list[str]]
    """Scene URI -> its prompts."""


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (Ray workers started meanwhile inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _upload(server: LocalS3Server, scenes: list[_Scene], workdir: Path, name: str) -> _Archive:
    """Put the scenes in a fresh bucket and write their questions table (absolute scene URIs, prompts)."""
    bucket = server.new_bucket("bench")
    rows, prompts, keys = [], {}, []
    for scene in scenes:
        key = scene.path.name
        server.client.upload_file(str(scene.path), bucket, key)
        uri = f"s3://{bucket}/{key}"
        keys.append(key)
        prompts[uri] = [q.prompt() for q in scene.questions]
        rows += [
            {
                "question_id": q.question_id,
                "scene": uri,
                "question": q.question,
                "choices": q.choices or None,
                "bbox": q.bbox,
                "prompt": q.prompt(),
            }
            for q in scene.questions
        ]
    table = workdir / f"{name}-questions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    return _Archive(bucket=bucket, keys=keys, questions=str(table), prompts=prompts)


def _empty(server: LocalS3Server, archive: _Archive) -> None:
    """Delete the archive's objects: the server holds them in memory."""
    for key in archive.keys:
        server.client.delete_object(Bucket=archive.bucket, Key=key)


def _vqa_config(
    config: VqaBenchConfig,
    model_dir: Path,
    archive: _Archive,
    pruning: PruningConfig,
    output: Path,
    server: LocalS3Server,
) -> VqaConfig:
    return VqaConfig(
        model=str(model_dir),
        questions=archive.questions,
        output=str(output),
        pruning=pruning,
        storage=server.storage(),
        max_new_tokens=config.max_new_tokens,
    )


def _pipeline_run(
    config: VqaBenchConfig,
    server: LocalS3Server,
    scenes: list[_Scene],
    model_dir: Path,
    workdir: Path,
    strategy: StrategyName,
) -> PipelineRun:
    archive = _upload(server, scenes, workdir, strategy.value)
    pruning = strategy_config(strategy, load_model_config(str(model_dir)), config.size, config.size)
    output = workdir / f"out-{strategy.value}"
    before = server.stats()
    summary = run_vqa(_vqa_config(config, model_dir, archive, pruning, output, server))
    sent = (server.stats() - before).bytes_sent
    _empty(server, archive)
    rows = pa.concat_tables([pq.read_table(part) for part in sorted(output.glob("part-*.parquet"))])
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    answered = pc.is_valid(rows["answer"])

    def total(column: str) -> float:
        return pc.sum(rows[column]).as_py() or 0.0

    metered = rows["bytes_read"].null_count == 0
    return PipelineRun(
        strategy=strategy.value,
        budget=pruning.budget,
        wall_s=summary.wall_s,
        scenes=summary.scenes,
        rows=summary.rows,
        errors=summary.errors,
        bytes_read=int(total("bytes_read")) if metered else None,
        server_bytes=sent,
        object_bytes=sum(scene.path.stat().st_size for scene in scenes),
        kept=pc.mean(pc.filter(rows["tokens_kept"], answered)).as_py() or 0.0,
        dense=pc.mean(pc.filter(rows["tokens_dense"], answered)).as_py() or 0.0,
        read_s=total("read_ms") / 1e3,
        encode_s=total("encode_ms") / 1e3,
        answer_s=total("answer_ms") / 1e3,
        operators=parse_operator_stats(manifest["runs"][-1]["stats"]),
    )


def _baseline_run(
    config: VqaBenchConfig, server: LocalS3Server, scenes: list[_Scene], model_dir: Path, workdir: Path
) -> BaselineRun:
    archive = _upload(server, scenes, workdir, "baseline")
    start = time.perf_counter()
    model, _ = load_model(str(model_dir))
    load_s = time.perf_counter() - start
    budget = context_budget(model, config.baseline_text_reserve, config.max_new_tokens)
    times = [
        naive_scene(
            model,
            uri,
            prompts,
            server.storage(),
            side=config.baseline_side,
            budget=budget,
            max_new_tokens=config.max_new_tokens,
        )
        for uri, prompts in archive.prompts.items()
    ]
    _empty(server, archive)
    return BaselineRun(load_s=load_s, scenes=times, questions=sum(len(p) for p in archive.prompts.values()))


def _rss_run(
    config: VqaBenchConfig, server: LocalS3Server, scene: _Scene, model_dir: Path, workdir: Path, strategy: StrategyName
) -> RssRun:
    """`run_vqa` on the large scene in a fresh Ray, its workers' memory sampled throughout."""
    archive = _upload(server, [scene], workdir, f"rss-{strategy.value}")
    size = scene.size
    pruning = strategy_config(strategy, load_model_config(str(model_dir)), size, size)
    ray.shutdown()
    ray.init(address="local", num_cpus=config.num_cpus, log_to_driver=False)
    try:
        with WorkerMemorySampler(config.rss_interval_s) as sampler:
            summary = run_vqa(
                _vqa_config(config, model_dir, archive, pruning, workdir / f"out-rss-{strategy.value}", server)
            )
    finally:
        ray.shutdown()
        _empty(server, archive)
    if summary.errors:
        raise RuntimeError(f"the {strategy.value} run on the {size}^2 scene wrote {summary.errors} error rows")
    return RssRun(
        strategy=strategy.value,
        size=size,
        wall_s=summary.wall_s,
        workers=list(sampler.workers.values()),
        peak_total=sampler.peak_total,
    )


def run_vqa_benchmark(config: VqaBenchConfig) -> VqaBenchResult:
    """Everything the module docstring lists; scenes and the model are generated on first use."""
    cache = config.cache_dir.expanduser()
    scenes = [_Scene.of(cache, config.size, seed, config.questions) for seed in range(config.scenes)]
    large = _Scene.of(cache, config.rss_size, 0, config.questions) if config.rss_size else None
    model_dir = saved_bench_model(cache, config.model_seed)
    result = VqaBenchResult(config=config, object_bytes=sum(scene.path.stat().st_size for scene in scenes))
    with tempfile.TemporaryDirectory(prefix="uhr-bench-vqa-") as tmp, LocalS3Server() as server:
        workdir = Path(tmp)
        with _environment(server.client_env()):
            ray.init(address="local", num_cpus=config.num_cpus, log_to_driver=False)
            try:
                for strategy in config.strategies:
                    result.runs.append(
                        _pipeline_run(config, server, scenes, model_dir, workdir, StrategyName(strategy))
                    )
            finally:
                ray.shutdown()
            if config.baseline:
                result.baseline = _baseline_run(config, server, scenes, model_dir, workdir)
            if large is not None:
                for strategy in config.rss_strategies:
                    result.rss.append(_rss_run(config, server, large, model_dir, workdir, StrategyName(strategy)))
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

_MIB = 1 << 20


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def format_report(result: VqaBenchResult) -> str:
    """Markdown tables of the runs, then each figure against its target."""
    config = result.config
    n, k = config.scenes, config.questions
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"## VQA job: {n} synthetic {config.size}^2 scenes x {k} questions, local S3 server, this machine",
        "",
        f"Ray CPUs {config.num_cpus or os.cpu_count()}, load average {load}; answers of {config.max_new_tokens} "
        f"tokens; objects {result.object_bytes / _MIB:.1f} MiB in all. Wall time of `run_vqa` includes Ray Data's "
        "actor start and model load, not Ray's own start.",
        "",
        "| strategy | budget | wall s | scenes/s | questions/s | vs naive | running s | questions/s running | vs "
        "naive running | kept / dense tokens | read s | encode s | answer s | bytes read MiB (rows) | server sent "
        "MiB | bytes read / object bytes |",
        "|" + "---|" * 16,
    ]
    baseline_qps = result.baseline.questions_per_s if result.baseline else None

    def versus(qps: float) -> str:
        return f"{qps / baseline_qps:.2f}x" if baseline_qps else "-"

    for r in result.runs:
        read = "-" if r.bytes_read is None else f"{r.bytes_read / _MIB:.2f}"
        fraction = "-" if r.bytes_fraction is None else f"{r.bytes_fraction:.3f}"
        lines.append(
            f"| {r.strategy} | {r.budget} | {r.wall_s:.1f} | {r.scenes_per_s:.3f} | {r.questions_per_s:.3f} | "
            f"{versus(r.questions_per_s)} | {r.running_s:.1f} | {r.running_questions_per_s:.3f} | "
            f"{versus(r.running_questions_per_s)} | {r.kept:,.0f} / {r.dense:,.0f} | {r.read_s:.1f} | "
            f"{r.encode_s:.1f} | {r.answer_s:.1f} | {read} | {r.server_bytes / _MIB:.2f} | {fraction} |"
        )
    lines += [
        "",
        "running s: the slowest Ray Data operator's span (first task start to last task end), i.e. the run without "
        "the actor start, model load and first read; read / encode / answer s: sums of the rows' shares.",
    ]
    lines += [
        "",
        "Ray Data operators per run (`ds.stats()`: span = first task start to last task end; busy = sum of task "
        "wall times); wall / slowest span, and how busy the slowest operator was within its span:",
        "",
    ]
    for r in result.runs:
        ops = "; ".join(
            f"{op.name} {op.tasks} tasks, span {op.span_s:.2f} s, busy {op.busy_s:.2f} s" for op in r.operators
        )
        lines.append(
            f"- {r.strategy}: {ops}; wall / slowest span {r.wall_over_slowest:.2f}, slowest busy {r.slowest_busy:.0%}"
        )

    if result.baseline is not None:
        b = result.baseline
        lines += [
            "",
            f"## Naive baseline: whole-object download, full decode, every tile at {config.baseline_side} px, pooled "
            f"only to fit the LM's context ({b.scenes[0].tokens:,} tokens), one question at a time (this process, "
            "torch threads: all cores)",
            "",
            "| scenes | questions | model load s | download s | decode s | encode s | answer s | wall s | "
            "questions/s | tiles / scene |",
            "|" + "---|" * 10,
            f"| {len(b.scenes)} | {b.questions} | {b.load_s:.2f} | {sum(s.download_s for s in b.scenes):.1f} | "
            f"{sum(s.decode_s for s in b.scenes):.1f} | {sum(s.encode_s for s in b.scenes):.1f} | "
            f"{sum(s.answer_s for s in b.scenes):.1f} | {b.wall_s:.1f} | {b.questions_per_s:.3f} | "
            f"{statistics.mean(s.tiles for s in b.scenes):.0f} |",
        ]

    if result.rss:
        lines += [
            "",
            f"## Peak RSS of the Ray worker processes, one {result.rss[0].size}^2 scene x {k} questions, fresh Ray "
            "per strategy",
            "",
            f"(psutil sampler thread over the raylet's worker processes every {config.rss_interval_s} s, each "
            "worker's peak = max of sampled RSS and its VmHWM)",
            "",
            "| strategy | wall s | worst worker peak MiB | its role | all workers' peak sum MiB | workers |",
            "|" + "---|" * 6,
        ]
        for r in result.rss:
            worst = r.peak_worker
            lines.append(
                f"| {r.strategy} | {r.wall_s:.1f} | {worst.peak_rss / _MIB:.0f} | {worst.role} | "
                f"{r.peak_total / _MIB:.0f} | {len(r.workers)} |"
            )

    lines += ["", "## Targets", ""]
    default_run = next((r for r in result.runs if r.strategy == DEFAULT_STRATEGY.value), None)
    if default_run is not None and baseline_qps:
        for label, qps in (
            ("end to end", default_run.questions_per_s),
            ("running", default_run.running_questions_per_s),
        ):
            ratio = qps / baseline_qps
            lines.append(
                f"- pipeline ({DEFAULT_STRATEGY.value}) / naive questions/s, {label}: {ratio:.2f}x "
                f"(target >= {SPEEDUP_TARGET:.0f}x): " + _verdict(ratio >= SPEEDUP_TARGET)
            )
    if default_run is not None:
        r = default_run
        lines.append(
            f"- wall / slowest stage ({r.strategy}, {r.slowest.name}): {r.wall_over_slowest:.2f} (target <= "
            f"{OVERLAP_TARGET}): "
            + _verdict(r.wall_over_slowest <= OVERLAP_TARGET)
            + f"; {r.startup_s:.1f} s of the {r.wall_s:.1f} s lie outside the slowest stage's span (actor start, model "
            f"load, first read), inside it that stage was busy {r.slowest_busy:.0%} of the time; at this pace the "
            f"start-up is amortised to {OVERLAP_TARGET} after {r.scenes_to_amortise(OVERLAP_TARGET)} scenes"
        )
    c2f = next((r for r in result.runs if r.strategy == StrategyName.C2F.value), None)
    if c2f is not None and c2f.bytes_fraction is not None:
        lines.append(
            f"- c2f bytes read / object bytes: {c2f.bytes_fraction:.3f} (target <= {C2F_BYTES_TARGET}): "
            + _verdict(c2f.bytes_fraction <= C2F_BYTES_TARGET)
        )
    for r in result.rss:
        peak = r.peak_worker.peak_rss
        lines.append(
            f"- {r.strategy} worst worker peak RSS on {r.size}^2: {peak / _MIB:.0f} MiB (target <= "
            f"{WORKER_RSS_TARGET / _MIB:.0f} MiB): " + _verdict(peak <= WORKER_RSS_TARGET)
        )
    return "\n".join(lines)


__all__ = [
    "C2F_BYTES_TARGET",
    "OVERLAP_TARGET",
    "SPEEDUP_TARGET",
    "WORKER_RSS_TARGET",
    "BaselineRun",
    "OperatorTime",
    "PipelineRun",
    "RssRun",
    "VqaBenchConfig",
    "VqaBenchResult",
    "format_report",
    "parse_operator_stats",
    "run_vqa_benchmark",
]
