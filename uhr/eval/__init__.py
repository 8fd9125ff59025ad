"""Benchmarks in their published formats, scored exactly as their authors score them, and reports.

`benchmarks` loads XLRS-Bench lite, LRS-VQA, MME-RealWorld-RS and uhr's synthetic archives into one
item table with prompts in each benchmark's own template; `scoring` judges replies and aggregates
as the authors' scripts do; `report` joins the VQA job's answers to the items and writes
`report.json`, `report.md` and a plot of accuracy against kept visual tokens.
"""

from __future__ import annotations

from uhr.eval.benchmarks import (
    ITEM_SCHEMA,
    Benchmark,
    BenchmarkFormatError,
    BenchmarkSpec,
    MmePromptStyle,
    load_benchmark,
    load_lrs_vqa,
    load_mme_realworld_rs,
    load_synthetic,
    load_xlrs_lite,
)
from uhr.eval.report import Report, RunResult, build_report, evaluate, join_answers, write_report
from uhr.eval.scoring import (
    Accuracy,
    BenchmarkScore,
    LrsVqaScore,
    MmeScore,
    SyntheticScore,
    XlrsScore,
    judge,
    summarize,
)
from uhr.eval.wordnet import WordNetMissingError, load_wordnet

__all__ = [
    "ITEM_SCHEMA",
    "Accuracy",
    "Benchmark",
    "BenchmarkFormatError",
    "BenchmarkScore",
    "BenchmarkSpec",
    "LrsVqaScore",
    "MmePromptStyle",
    "MmeScore",
    "Report",
    "RunResult",
    "SyntheticScore",
    "WordNetMissingError",
    "XlrsScore",
    "build_report",
    "evaluate",
    "join_answers",
    "judge",
    "load_benchmark",
    "load_lrs_vqa",
    "load_mme_realworld_rs",
    "load_synthetic",
    "load_wordnet",
    "load_xlrs_lite",
    "summarize",
    "write_report",
]
