"""Evaluation reports: scores per benchmark, pruning strategy and token budget, against tokens kept.

Input: the benchmark items (`uhr.eval.benchmarks.ITEM_SCHEMA`, one or several benchmarks) and the
answer rows the VQA job writes, one per question and run:

    question_id   string        the item it answers
    answer        string|null   the raw model reply; null on an error row
    strategy      string        pruning strategy of the run ("none", "geollava", ...)
    budget        int|null      visual-token budget of the run; null for runs without one
    tokens_kept   int|null      visual tokens the LLM saw
    tokens_dense  int|null      visual tokens before pruning
    error         string|null   optional: why the question has no answer
    evidence_tokens int|null    optional: kept tokens over the item's `bbox` (null: no bbox was asked with)
    evidence_px   double|null   optional: side of the finest of them
    source        string        optional: benchmark, when question ids repeat across benchmarks

A run is one (strategy, budget). Each run is scored on EVERY item of each benchmark it answered:
an item without an answer row counts as wrong and as `missing`, an error row as wrong and as
`errors`, so a partial run never looks better than it is. Where items name their evidence (`bbox`)
and the answers carry the evidence columns, a run also reports how often its kept tokens
*resolved* the evidence: some kept token overlapping the bbox is no larger than the object the answer depends on
(`object_size_px` where the benchmark gives it, else the bbox's longest side; a token coarser than
the object blurs it into its surroundings), over the answered items asked with a bbox, and over
those of small objects; and its accuracy on the small-object items it resolved, which tells a
strategy that did not bring the evidence from a model that did not read it.

Outputs under `out_uri`: `report.json` (everything), `report.md` (one table per benchmark, then
its per-category breakdown) and `accuracy_vs_tokens.png` (each benchmark's headline accuracy
against mean kept visual tokens, one line per strategy).
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from uhr.eval.benchmarks import Benchmark
from uhr.eval.scoring import BenchmarkScore, judge, summarize
from uhr.storage import StorageConfig, join_uri, uri_protocol

ANSWER_COLUMNS: tuple[str, ...] = ("question_id", "answer", "strategy", "budget", "tokens_kept", "tokens_dense")
EVIDENCE_COLUMNS: dict[str, pa.DataType] = {"evidence_tokens": pa.int64(), "evidence_px": pa.float64()}
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PLOT = "accuracy_vs_tokens.png"

RunKey = tuple[str, int | None]


@dataclass(frozen=True)
class RunResult:
    """One run (strategy, budget) on one benchmark: counts, token use and the benchmark's score."""

    source: str
    strategy: str
    budget: int | None
    items: int
    answered: int
    errors: int
    missing: int
    mean_tokens_kept: float | None
    mean_tokens_dense: float | None
    score: BenchmarkScore
    evidence_resolved: float | None = None
    evidence_resolved_small: float | None = None
    resolved_small_accuracy: float | None = None

    @property
    def kept_fraction(self) -> float | None:
        if self.mean_tokens_kept is None or not self.mean_tokens_dense:
            return None
        return self.mean_tokens_kept / self.mean_tokens_dense

    @property
    def label(self) -> str:
        return self.strategy if self.budget is None else f"{self.strategy}@{self.budget}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "strategy": self.strategy,
            "budget": self.budget,
            "items": self.items,
            "answered": self.answered,
            "errors": self.errors,
            "missing": self.missing,
            "mean_tokens_kept": self.mean_tokens_kept,
            "mean_tokens_dense": self.mean_tokens_dense,
            "kept_fraction": self.kept_fraction,
            "evidence_resolved": self.evidence_resolved,
            "evidence_resolved_small": self.evidence_resolved_small,
            "resolved_small_accuracy": self.resolved_small_accuracy,
            "headline": {"name": self.score.headline_name, "value": self.score.headline},
            "metrics": self.score.to_dict(),
        }


@dataclass(frozen=True)
class Report:
    """All runs on all benchmarks, sorted by benchmark, strategy and budget."""

    runs: list[RunResult]

    def benchmarks(self) -> list[str]:
        return sorted({run.source for run in self.runs})

    def runs_of(self, source: str) -> list[RunResult]:
        return [run for run in self.runs if run.source == source]

    def to_dict(self) -> dict[str, Any]:
        return {"benchmarks": self.benchmarks(), "runs": [run.to_dict() for run in self.runs]}


# ---------------------------------------------------------------------------------------------
# Joining answers to items.


def _budget(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def join_answers(items: pa.Table, answers: pa.Table) -> dict[RunKey, pa.Table]:
    """Per run, the items of every benchmark it answered, with its answer columns joined on.

    Adds `reply` (null when missing or failed), `status` ("answered", "error", "missing"),
    `tokens_kept`, `tokens_dense` and, when the answers carry them, `evidence_tokens` and
    `evidence_px` to the item columns. Raises ValueError for answers to unknown questions,
    duplicate answers within a run, or ambiguous question ids.
    """
    missing = [name for name in ANSWER_COLUMNS if name not in answers.column_names]
    if missing:
        raise ValueError(f"answer table lacks column(s) {', '.join(missing)}; has {answers.column_names}")
    keyed_by_source = "source" in answers.column_names
    item_keys = list(
        zip(items.column("source").to_pylist(), items.column("question_id").to_pylist(), strict=True)
    )
    if len(set(item_keys)) != len(item_keys):
        raise ValueError("items hold duplicate (source, question_id) pairs")
    item_key_set = set(item_keys)
    by_id: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in item_keys:
        by_id[key[1]].append(key)

    runs: dict[RunKey, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    errors = answers.column("error").to_pylist() if "error" in answers.column_names else [None] * answers.num_rows
    sources = answers.column("source").to_pylist() if keyed_by_source else [None] * answers.num_rows
    evidence = list(EVIDENCE_COLUMNS) if set(EVIDENCE_COLUMNS) <= set(answers.column_names) else []
    unknown: list[str] = []
    for row, error, source in zip(answers.select([*ANSWER_COLUMNS, *evidence]).to_pylist(), errors, sources, strict=True):
        qid = str(row["question_id"])
        if keyed_by_source:
            key = (source, qid)
            if key not in item_key_set:
                unknown.append(f"{source}/{qid}")
                continue
        else:
            candidates = by_id.get(qid, [])
            if not candidates:
                unknown.append(qid)
                continue
            if len(candidates) > 1:
                raise ValueError(
                    f"question id {qid!r} exists in several benchmarks; give the answers a 'source' column"
                )
            key = candidates[0]
        run: RunKey = (str(row["strategy"]), _budget(row["budget"]))
        if key in runs[run]:
            raise ValueError(f"run {run} answers question {key[0]}/{key[1]} more than once")
        failed = bool(error) or row["answer"] is None
        runs[run][key] = {
            "reply": None if failed else row["answer"],
            "status": "error" if failed else "answered",
            "tokens_kept": row["tokens_kept"],
            "tokens_dense": row["tokens_dense"],
            **{name: row[name] for name in evidence},
        }
    if unknown:
        raise ValueError(f"{len(unknown)} answer(s) to questions not among the items, e.g. {unknown[:5]}")

    joined: dict[RunKey, pa.Table] = {}
    empty = {"reply": None, "status": "missing", "tokens_kept": None, "tokens_dense": None}
    empty |= {name: None for name in evidence}
    for run, answered in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1] is not None, kv[0][1] or 0)):
        sources_answered = {key[0] for key in answered}
        mask = pa.array([key[0] in sources_answered for key in item_keys])
        subset = items.filter(mask)
        rows = [answered.get(key, empty) for key in item_keys if key[0] in sources_answered]
        table = (
            subset.append_column("reply", pa.array([r["reply"] for r in rows], pa.string()))
            .append_column("status", pa.array([r["status"] for r in rows], pa.string()))
            .append_column("tokens_kept", pa.array([r["tokens_kept"] for r in rows], pa.int64()))
            .append_column("tokens_dense", pa.array([r["tokens_dense"] for r in rows], pa.int64()))
        )
        for name in evidence:
            table = table.append_column(name, pa.array([r[name] for r in rows], EVIDENCE_COLUMNS[name]))
        joined[run] = table
    return joined


# ---------------------------------------------------------------------------------------------
# Scoring runs.


def _mean_of(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _evidence_flags(part: pa.Table) -> list[tuple[bool, bool, bool]] | None:
    """(small, resolved, correct) of each answered item asked with a bbox; None without the evidence columns.

    Resolved: some kept token overlapping the bbox is no larger than the object (`object_size_px`
    where the benchmark gives it, else the bbox's longest side).
    """
    if "evidence_tokens" not in part.column_names:
        return None
    flags = []
    for status, bbox, size, count, px, small, correct in zip(
        part.column("status").to_pylist(),
        part.column("bbox").to_pylist(),
        part.column("object_size_px").to_pylist(),
        part.column("evidence_tokens").to_pylist(),
        part.column("evidence_px").to_pylist(),
        part.column("small").to_pylist(),
        part.column("correct").to_pylist(),
        strict=True,
    ):
        if status != "answered" or bbox is None or count is None:
            continue
        size = size if size is not None else max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        flags.append((bool(small), px is not None and px <= size, bool(correct)))
    return flags


def evidence_resolved(part: pa.Table, small_only: bool = False) -> float | None:
    """Share of the answered items asked with a bbox (small ones only, if asked) whose evidence a kept token resolved.

    None when the answers carry no evidence columns or no item qualifies.
    """
    flags = _evidence_flags(part)
    resolved = [r for small, r, _ in flags or [] if small or not small_only]
    return sum(resolved) / len(resolved) if resolved else None


def resolved_small_accuracy(part: pa.Table) -> float | None:
    """Accuracy on the small-object items whose evidence a kept token resolved: whether the model
    reads what the pruning brought it (None when no such item or no evidence columns)."""
    correct = [ok for small, resolved, ok in _evidence_flags(part) or [] if small and resolved]
    return sum(correct) / len(correct) if correct else None


def evaluate(items: pa.Table, answers: pa.Table, wordnet: WordNetCorpusReader | None = None) -> Report:
    """Score every run of `answers` on the benchmarks in `items` (see the module docstring)."""
    results = []
    for (strategy, budget), table in join_answers(items, answers).items():
        judged = judge(table, wordnet)
        for source in sorted(set(judged.column("source").to_pylist())):
            part = judged.filter(pc.equal(judged.column("source"), source))
            status = part.column("status").to_pylist()
            answered = [s == "answered" for s in status]
            kept = [v for v, ok in zip(part.column("tokens_kept").to_pylist(), answered, strict=True) if ok]
            dense = [v for v, ok in zip(part.column("tokens_dense").to_pylist(), answered, strict=True) if ok]
            results.append(
                RunResult(
                    source=source,
                    strategy=strategy,
                    budget=budget,
                    items=part.num_rows,
                    answered=sum(answered),
                    errors=status.count("error"),
                    missing=status.count("missing"),
                    mean_tokens_kept=_mean_of(kept),
                    mean_tokens_dense=_mean_of(dense),
                    score=summarize(part, Benchmark(source)),
                    evidence_resolved=evidence_resolved(part),
                    evidence_resolved_small=evidence_resolved(part, small_only=True),
                    resolved_small_accuracy=resolved_small_accuracy(part),
                )
            )
    results.sort(key=lambda r: (r.source, r.strategy, r.budget is not None, r.budget or 0))
    return Report(results)


# ---------------------------------------------------------------------------------------------
# Rendering.


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def to_markdown(report: Report) -> str:
    """`report.md`: per benchmark, a table of runs (counts, tokens, accuracies in %) and a breakdown."""
    lines = ["# uhr evaluation report", ""]
    lines.append(
        "Accuracies in %. A run is one pruning strategy at one visual-token budget; items it did not "
        "answer count as wrong (`missing`, `errors`)."
    )
    for source in report.benchmarks():
        runs = report.runs_of(source)
        summary_names = list(runs[0].score.summary_columns())
        lines += ["", f"## {source}", ""]
        header = ["strategy", "budget", "items", "answered", "errors", "missing"]
        header += ["kept tokens", "dense tokens", "kept %"]
        evidence = any(run.evidence_resolved is not None for run in runs)
        if evidence:
            header += ["evidence resolved %", "small evidence resolved %", "accuracy on resolved small"]
        rows = [
            [
                run.strategy,
                "—" if run.budget is None else str(run.budget),
                str(run.items),
                str(run.answered),
                str(run.errors),
                str(run.missing),
                _num(run.mean_tokens_kept),
                _num(run.mean_tokens_dense),
                _pct(run.kept_fraction),
                *(
                    (_pct(run.evidence_resolved), _pct(run.evidence_resolved_small), _pct(run.resolved_small_accuracy))
                    if evidence
                    else ()
                ),
                *(_pct(run.score.summary_columns().get(name)) for name in summary_names),
            ]
            for run in runs
        ]
        lines += _table(header + summary_names, rows)
        notes = runs[0].score.notes()
        if evidence:
            notes = [
                *notes,
                "evidence resolved: of the answered items asked with a bbox, those where a kept token no larger than "
                "the object (its size where given, else the bbox's longest side) overlaps the bbox; accuracy on "
                "resolved small: of the small-object items so resolved, those answered right (did the model read what "
                "the pruning brought it?)",
            ]
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
        breakdown_names = sorted({name for run in runs for name in run.score.breakdown()})
        lines += ["", f"### {source}: accuracy by category", ""]
        rows = [[name, *(_pct(run.score.breakdown().get(name)) for run in runs)] for name in breakdown_names]
        lines += _table(["category", *(run.label for run in runs)], rows)
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_tokens(report: Report) -> bytes:
    """PNG bytes: per benchmark, headline accuracy (%) against mean kept tokens, one line per strategy."""
    sources = report.benchmarks()
    figure = Figure(figsize=(5.5 * max(len(sources), 1), 4.2), layout="constrained")
    axes = figure.subplots(1, max(len(sources), 1), squeeze=False)[0]
    for ax, source in zip(axes, sources, strict=False):
        runs = [run for run in report.runs_of(source) if run.mean_tokens_kept and run.score.headline is not None]
        by_strategy: dict[str, list[RunResult]] = defaultdict(list)
        for run in runs:
            by_strategy[run.strategy].append(run)
        for strategy, points in sorted(by_strategy.items()):
            points.sort(key=lambda run: run.mean_tokens_kept)
            xs = [run.mean_tokens_kept for run in points]
            ys = [100 * run.score.headline for run in points]
            ax.plot(xs, ys, marker="o", label=strategy)
            for run, x, y in zip(points, xs, ys, strict=True):
                if run.budget is not None:
                    ax.annotate(str(run.budget), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        tokens = [run.mean_tokens_kept for run in runs]
        if tokens and max(tokens) > 10 * min(tokens):
            ax.set_xscale("log")
        ax.set_title(source)
        ax.set_xlabel("mean kept visual tokens")
        ax.set_ylabel(f"{runs[0].score.headline_name if runs else 'accuracy'} (%)")
        ax.grid(True, alpha=0.3)
        if runs:
            ax.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(
    report: Report,
    out_uri: str,
    storage: StorageConfig | None = None,
    *,
    json_extra: dict[str, Any] | None = None,
    markdown_extra: tuple[str, ...] = (),
) -> dict[str, str]:
    """Write `report.json`, `report.md` and `accuracy_vs_tokens.png` under `out_uri`; return their URIs.

    `json_extra` adds top-level keys to the JSON, `markdown_extra` sections after the tables.
    """
    fs = (storage or StorageConfig()).filesystem(out_uri)
    if uri_protocol(out_uri) is None:
        fs.makedirs(out_uri, exist_ok=True)
    contents = {
        REPORT_JSON: json.dumps({**report.to_dict(), **(json_extra or {})}, indent=2).encode("utf-8"),
        REPORT_MD: "\n".join([to_markdown(report), *markdown_extra]).encode("utf-8"),
        REPORT_PLOT: plot_accuracy_vs_tokens(report),
    }
    written = {}
    for name, data in contents.items():
        uri = join_uri(out_uri, name)
        with fs.open(uri, "wb") as handle:
            handle.write(data)
        written[name] = uri
    return written


def build_report(
    items: pa.Table,
    answers: pa.Table,
    out_uri: str,
    *,
    storage: StorageConfig | None = None,
    wordnet: WordNetCorpusReader | None = None,
) -> Report:
    """Score `answers` against `items` and write the report files under `out_uri`."""
    report = evaluate(items, answers, wordnet)
    if not report.runs:
        raise ValueError("no answers to report on")
    write_report(report, out_uri, storage)
    return report
