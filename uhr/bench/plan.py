"""Driver benchmark: what planning a VQA run costs the driver before any scene is read.

A synthetic questions table (`questions` rows, `questions_per_scene` on each scene, every
`multi_image_every`-th question on an image pair, choices and a bbox on each) is written as Parquet
and as CSV, read back by `load_questions`, planned by `make_plan` with a share of it already done,
and turned into the job's input dataset by `input_dataset` on a local Ray. Each step's wall time
and the growth of this process's resident memory over it are measured; nothing else runs.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field

from uhr.pipeline.plan import load_questions, make_plan
from uhr.pipeline.vqa import input_dataset
from uhr.storage import StorageConfig


class PlanBenchConfig(BaseModel):
    """What `python -m jobs.bench_plan` measures."""

    model_config = ConfigDict(extra="forbid")

    questions: int = Field(1_000_000, ge=1, description="Rows of the questions table.")
    done_fraction: float = Field(0.5, ge=0, lt=1, description="Share of the questions the output already holds (every k-th).")
    questions_per_scene: int = Field(8, ge=1, description="Questions asked of each scene.")
    multi_image_every: int = Field(10, ge=0, description="Every n-th question is on a pair of images; 0: none.")


@dataclass
class Step:
    """One measured step."""

    name: str
    seconds: float
    rss_growth_mb: float
    """Peak resident memory of this process during the step, less its resident memory before it."""
    result: str


def questions_table(config: PlanBenchConfig) -> pa.Table:
    """The synthetic questions: ids q0000000.., scenes relative to the archive, JSON-ready lists."""
    n = config.questions
    pairs = [bool(config.multi_image_every) and i % config.multi_image_every == 1 for i in range(n)]
    return pa.table(
        {
            "question_id": [f"q{i:07d}" for i in range(n)],
            "scene": [f"scenes/scene_{i // config.questions_per_scene:07d}.tif" for i in range(n)],
            "question": ["What colour is the car in the region?"] * n,
            "choices": [["(A) red", "(B) blue", "(C) white"]] * n,
            "bbox": [[float(i % 8000), 10.0, float(i % 8000) + 24.0, 34.0] for i in range(n)],
            "extra_scenes": [[f"scenes/later_{i // 80:07d}.tif"] if pair else None for i, pair in enumerate(pairs)],
        }
    )


def _as_csv(table: pa.Table) -> pa.Table:
    """`table` with its list columns as JSON text, as a CSV holds them."""
    for name in ("choices", "bbox", "extra_scenes"):
        text = [None if cell is None else json.dumps(cell) for cell in table[name].to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(text, pa.string()))
    return table


def _measure(name: str, work: Callable[[], Any], describe: Callable[[Any], str]) -> tuple[Step, Any]:
    """Run `work`, sampling this process's RSS every 10 ms from a thread."""
    process = psutil.Process()
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, name="uhr-rss", daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = work()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return Step(name, seconds, (peak - before) / 2**20, describe(result)), result


def run_plan_benchmark(config: PlanBenchConfig) -> list[Step]:
    """Write, read, plan and make the input dataset of the synthetic table; see the module docstring."""
    storage = StorageConfig()
    steps = []
    with tempfile.TemporaryDirectory(prefix="uhr-bench-plan-") as folder:
        table = questions_table(config)
        parquet, csv = Path(folder) / "questions.parquet", Path(folder) / "questions.csv"
        pq.write_table(table, parquet)
        pacsv.write_csv(_as_csv(table), csv)
        del table
        step, _ = _measure("load_questions (CSV)", lambda: load_questions(str(csv), storage), lambda t: f"{t.num_rows:,} rows")
        steps.append(step)
        step, questions = _measure(
            "load_questions (Parquet)", lambda: load_questions(str(parquet), storage), lambda t: f"{t.num_rows:,} rows"
        )
        steps.append(step)
    every = round(1 / config.done_fraction) if config.done_fraction else 0
    done = pa.array(questions["question_id"].to_pylist()[::every] if every else [], pa.string())
    step, plan = _measure(
        "make_plan",
        lambda: make_plan(questions, "s3://bucket/archive", done),
        lambda p: f"{p.pending:,} pending in {p.groups.num_rows:,} groups",
    )
    steps.append(step)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        step, _ = _measure("input_dataset", lambda: input_dataset(plan.groups), lambda ds: f"{ds.num_blocks():,} blocks")
        steps.append(step)
    finally:
        if started:
            ray.shutdown()
    return steps


def format_report(steps: list[Step], config: PlanBenchConfig) -> str:
    """A Markdown table of the steps."""
    lines = [
        f"Driver planning: {config.questions:,} questions, {config.questions_per_scene} a scene, "
        f"every {config.multi_image_every}th on an image pair, {config.done_fraction:.0%} done; "
        f"load average {psutil.getloadavg()[0]:.1f} at the end.",
        "",
        "| step | s | RSS growth MB | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.seconds:.2f} | {s.rss_growth_mb:,.0f} | {s.result} |" for s in steps]
    return "\n".join(lines)
