"""Each benchmark scored the way its authors score it.

`judge` decides per item, from the model's reply, whether the answer is right:

* XLRS-Bench: `extract_choice(reply)` as a letter set equals the set of the answer's letters.
* MME-RealWorld: `extract_mme_choice(reply, choices)` equals the one-letter truth.
* LRS-VQA: the reply (whitespace-stripped, as LRS-VQA's inference script stores it) and the truth,
  both lower-cased, are equal, or share a WordNet synset (path similarity > 0.8). No punctuation
  is stripped: "gray." does not match "gray".
* synthetic: multiple choice by the XLRS rule, open answers by the LRS-VQA rule.

A missing reply (no answer row, or an error row) is wrong. The summaries then aggregate as the
authors' scripts do (see each `summarize_*`). The option letter the VQA job stored (`choice`) is
not used: the benchmark's own rule is re-applied to the raw reply, since MME-RealWorld's differs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from uhr.answers import extract_choice, extract_mme_choice, same_choice
from uhr.eval.benchmarks import XLRS_SUBTASKS, Benchmark
from uhr.eval.wordnet import are_synonyms, load_wordnet


@dataclass(frozen=True)
class Accuracy:
    """`correct` of `total` items; `value` is None when there are no items."""

    correct: int
    total: int

    @property
    def value(self) -> float | None:
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "total": self.total, "accuracy": self.value}


def _accuracies(keys: list[str], correct: list[bool]) -> dict[str, Accuracy]:
    hits: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    for key, ok in zip(keys, correct, strict=True):
        totals[key] += 1
        hits[key] += int(ok)
    return {key: Accuracy(hits[key], totals[key]) for key in sorted(totals)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Per-item rules.


def xlrs_correct(reply: str, answer: str) -> bool:
    """XLRS-Bench: the reply's letter set equals the answer's character set ("AC" == "CA")."""
    return same_choice(extract_choice(reply), answer)


def mme_correct(reply: str, answer: str, choices: list[str]) -> bool:
    """MME-RealWorld: the one letter the reply names equals the truth."""
    return extract_mme_choice(reply, choices) == answer


def lrs_vqa_correct(reply: str, answer: str, wordnet: WordNetCorpusReader) -> bool:
    """LRS-VQA: lower-cased exact match, or a shared WordNet synset (path similarity > 0.8)."""
    truth, text = answer.lower(), reply.strip().lower()
    return text == truth or are_synonyms(truth, text, wordnet)


def judge(table: pa.Table, wordnet: WordNetCorpusReader | None = None) -> pa.Table:
    """`table` with `prediction` (string, null without reply) and `correct` (bool) appended.

    Needs the item columns `source`, `form`, `answer`, `choices` and a nullable `reply` (the raw
    model text; null when the item has no answer). `prediction` is what the rule compared: the
    letter set for XLRS-style items, the letter for MME-RealWorld, the lower-cased reply for open
    answers. WordNet is loaded (`load_wordnet`) only when open answers need it.
    """
    names = ("source", "form", "answer", "choices", "reply")
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise ValueError(f"judge needs column(s) {', '.join(missing)}; got {table.column_names}")
    predictions: list[str | None] = []
    correct: list[bool] = []
    for source, form, answer, choices, reply in zip(*(table.column(n).to_pylist() for n in names), strict=True):
        if reply is None:
            predictions.append(None)
            correct.append(False)
        elif source == Benchmark.MME_REALWORLD_RS.value:
            predictions.append(extract_mme_choice(reply, choices))
            correct.append(predictions[-1] == answer)
        elif form == "mc":
            predictions.append(extract_choice(reply))
            correct.append(same_choice(predictions[-1], answer))
        else:
            if wordnet is None:
                wordnet = load_wordnet()
            predictions.append(reply.strip().lower())
            correct.append(lrs_vqa_correct(reply, answer, wordnet))
    return table.append_column("prediction", pa.array(predictions, pa.string())).append_column(
        "correct", pa.array(correct, pa.bool_())
    )


# ---------------------------------------------------------------------------------------------
# Aggregates.


@dataclass(frozen=True)
class XlrsScore:
    """XLRS-Bench as lmms-eval's `xlrs-lite` aggregates it.

    `micro`: correct / all items (the sample-weighted average, "w.Avg." in UHR-BAT's Table 1).
    `macro`: mean of the 13 sub-task accuracies; a sub-task without items counts 0, as published,
    so `subtasks_without_items` says when a partial run drags it down. `multi_image_items`: items
    published with several images (asked of all of them; see `uhr.eval.benchmarks`).
    """

    overall: Accuracy
    macro: float
    subtasks: dict[str, Accuracy]
    tasks: dict[str, Accuracy]
    subtasks_without_items: list[str]
    multi_image_items: int

    headline_name = "w.Avg. accuracy"

    @property
    def micro(self) -> float | None:
        return self.overall.value

    @property
    def headline(self) -> float | None:
        return self.micro

    def summary_columns(self) -> dict[str, float | None]:
        return {"w.Avg.": self.micro, "macro": self.macro}

    def notes(self) -> list[str]:
        notes = []
        if self.multi_image_items:
            notes.append(
                f"{self.multi_image_items} item(s) are published with several images; each was asked of "
                "all of them, in order, each image pruned to the budget on its own."
            )
        if self.subtasks_without_items:
            notes.append(
                f"macro counts {len(self.subtasks_without_items)} sub-task(s) without items as 0, as lmms-eval "
                f"does: {', '.join(self.subtasks_without_items)}."
            )
        return notes

    def breakdown(self) -> dict[str, float | None]:
        return {name: acc.value for name, acc in self.subtasks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "micro": self.micro,
            "macro": self.macro,
            "overall": self.overall.to_dict(),
            "subtasks": {name: acc.to_dict() for name, acc in self.subtasks.items()},
            "tasks": {name: acc.to_dict() for name, acc in self.tasks.items()},
            "subtasks_without_items": self.subtasks_without_items,
            "multi_image_items": self.multi_image_items,
        }


@dataclass(frozen=True)
class LrsVqaGroupScore:
    """Per-category accuracy, OA (correct / items) and AA (mean of category accuracies)."""

    categories: dict[str, Accuracy]
    overall: Accuracy

    @property
    def oa(self) -> float | None:
        return self.overall.value

    @property
    def aa(self) -> float | None:
        return _mean([acc.value for acc in self.categories.values() if acc.value is not None])

    def to_dict(self) -> dict[str, Any]:
        return {
            "OA": self.oa,
            "AA": self.aa,
            "overall": self.overall.to_dict(),
            "categories": {name: acc.to_dict() for name, acc in self.categories.items()},
        }


@dataclass(frozen=True)
class LrsVqaScore:
    """LRS-VQA as `Script/evaluation_LRSVQA.py` reports it: one group per source dataset.

    `pooled` is the same computation over all questions; the authors do not print it, uhr uses its
    OA as the one number per run.
    """

    subsets: dict[str, LrsVqaGroupScore]
    pooled: LrsVqaGroupScore

    headline_name = "OA (all sources)"

    @property
    def headline(self) -> float | None:
        return self.pooled.oa

    def notes(self) -> list[str]:
        return []

    def summary_columns(self) -> dict[str, float | None]:
        # Labelled "pooled": the authors report OA and AA per source only.
        columns = {"pooled OA": self.pooled.oa, "pooled AA": self.pooled.aa}
        for name, subset in self.subsets.items():
            columns[f"{name} OA"] = subset.oa
            columns[f"{name} AA"] = subset.aa
        return columns

    def breakdown(self) -> dict[str, float | None]:
        return {
            f"{name} / {category}": acc.value
            for name, subset in self.subsets.items()
            for category, acc in subset.categories.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {"subsets": {name: s.to_dict() for name, s in self.subsets.items()}, "pooled": self.pooled.to_dict()}


@dataclass(frozen=True)
class MmeScore:
    """MME-RealWorld-RS: accuracy per category (position, color, count), their mean (as UHR-BAT
    reports it) and the item-weighted accuracy (as MME-RealWorld's script prints for the split)."""

    categories: dict[str, Accuracy]
    overall: Accuracy

    headline_name = "mean of category accuracies"

    @property
    def mean(self) -> float | None:
        return _mean([acc.value for acc in self.categories.values() if acc.value is not None])

    @property
    def headline(self) -> float | None:
        return self.mean

    def notes(self) -> list[str]:
        return []

    def summary_columns(self) -> dict[str, float | None]:
        return {"mean": self.mean, "overall": self.overall.value}

    def breakdown(self) -> dict[str, float | None]:
        return {name: acc.value for name, acc in self.categories.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "overall": self.overall.to_dict(),
            "categories": {name: acc.to_dict() for name, acc in self.categories.items()},
        }


@dataclass(frozen=True)
class SyntheticScore:
    """Synthetic benchmark: accuracy overall, per category, and for small (< 32 px) vs large objects.

    Items whose object size is unknown (presence questions) count in neither size bucket.
    """

    overall: Accuracy
    categories: dict[str, Accuracy]
    small: Accuracy
    large: Accuracy
    forms: dict[str, Accuracy] = field(default_factory=dict)

    headline_name = "accuracy"

    @property
    def headline(self) -> float | None:
        return self.overall.value

    def notes(self) -> list[str]:
        return []

    def summary_columns(self) -> dict[str, float | None]:
        return {"accuracy": self.overall.value, "small": self.small.value, "large": self.large.value}

    def breakdown(self) -> dict[str, float | None]:
        return {name: acc.value for name, acc in self.categories.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "categories": {name: acc.to_dict() for name, acc in self.categories.items()},
            "small": self.small.to_dict(),
            "large": self.large.to_dict(),
            "forms": {name: acc.to_dict() for name, acc in self.forms.items()},
        }


BenchmarkScore = XlrsScore | LrsVqaScore | MmeScore | SyntheticScore


def _columns(table: pa.Table, *names: str) -> list[list[Any]]:
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise ValueError(f"scoring needs column(s) {', '.join(missing)}; got {table.column_names}")
    return [table.column(name).to_pylist() for name in names]


def summarize_xlrs(judged: pa.Table) -> XlrsScore:
    """Micro, macro, per sub-task and per task accuracy of judged XLRS-Bench items."""
    categories, correct, metas = _columns(judged, "category", "correct", "meta")
    unknown = sorted(set(categories) - set(XLRS_SUBTASKS))
    if unknown:
        raise ValueError(f"unknown XLRS-Bench categories {unknown}; expected one of {list(XLRS_SUBTASKS)}")
    subtasks = _accuracies(categories, correct)
    subtask_accuracies = [subtasks[name].value if name in subtasks else 0.0 for name in XLRS_SUBTASKS]
    multi_image = sum(1 for meta in metas if json.loads(meta).get("n_images", 1) > 1)
    return XlrsScore(
        overall=Accuracy(sum(correct), len(correct)),
        macro=sum(subtask_accuracies) / len(XLRS_SUBTASKS),
        subtasks={name: subtasks[name] for name in XLRS_SUBTASKS if name in subtasks},
        tasks=_accuracies([name.split("/")[0] for name in categories], correct),
        subtasks_without_items=[name for name in XLRS_SUBTASKS if name not in subtasks],
        multi_image_items=multi_image,
    )


def _lrs_group(categories: list[str], correct: list[bool]) -> LrsVqaGroupScore:
    return LrsVqaGroupScore(categories=_accuracies(categories, correct), overall=Accuracy(sum(correct), len(correct)))


def summarize_lrs_vqa(judged: pa.Table) -> LrsVqaScore:
    """Per source dataset (question-id prefix): per-category accuracy, OA and AA; plus all pooled."""
    categories, subsets, correct = _columns(judged, "category", "subset", "correct")
    by_subset: dict[str, tuple[list[str], list[bool]]] = defaultdict(lambda: ([], []))
    for category, subset, ok in zip(categories, subsets, correct, strict=True):
        by_subset[subset][0].append(category)
        by_subset[subset][1].append(ok)
    return LrsVqaScore(
        subsets={name: _lrs_group(*by_subset[name]) for name in sorted(by_subset)},
        pooled=_lrs_group(categories, correct),
    )


def summarize_mme(judged: pa.Table) -> MmeScore:
    """Per-category accuracy, their mean, and the item-weighted accuracy of MME-RealWorld-RS items."""
    categories, correct = _columns(judged, "category", "correct")
    return MmeScore(categories=_accuracies(categories, correct), overall=Accuracy(sum(correct), len(correct)))


def summarize_synthetic(judged: pa.Table) -> SyntheticScore:
    """Overall, per-category, per-form and small-vs-large accuracy of synthetic items."""
    categories, forms, small, correct = _columns(judged, "category", "form", "small", "correct")
    small_hits = [ok for is_small, ok in zip(small, correct, strict=True) if is_small is True]
    large_hits = [ok for is_small, ok in zip(small, correct, strict=True) if is_small is False]
    return SyntheticScore(
        overall=Accuracy(sum(correct), len(correct)),
        categories=_accuracies(categories, correct),
        small=Accuracy(sum(small_hits), len(small_hits)),
        large=Accuracy(sum(large_hits), len(large_hits)),
        forms=_accuracies(forms, correct),
    )


_SUMMARIZERS = {
    Benchmark.XLRS_LITE: summarize_xlrs,
    Benchmark.LRS_VQA: summarize_lrs_vqa,
    Benchmark.MME_REALWORLD_RS: summarize_mme,
    Benchmark.SYNTHETIC: summarize_synthetic,
}


def summarize(judged: pa.Table, benchmark: Benchmark | str) -> BenchmarkScore:
    """The benchmark's published aggregate of judged items (all of one benchmark)."""
    benchmark = Benchmark(benchmark)
    sources = set(judged.column("source").to_pylist())
    if sources - {benchmark.value}:
        raise ValueError(f"summarize({benchmark.value!r}) got items of {sorted(sources)}")
    return _SUMMARIZERS[benchmark](judged)
