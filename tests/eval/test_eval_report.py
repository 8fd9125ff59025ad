"""Reports: answers joined to items, runs scored per benchmark, report.json / report.md / plot written."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from PIL import Image

from uhr.eval.benchmarks import ITEM_SCHEMA
from uhr.eval.report import REPORT_JSON, REPORT_MD, REPORT_PLOT, build_report, evaluate, join_answers

COUNTING = "Counting/Overall counting"
LAND_USE = "Land use classification/Overall Land use classification"


def _item(source: str, qid: str, category: str, answer: str, form: str = "mc", small: bool | None = None) -> dict:
    return {
        "question_id": qid,
        "source": source,
        "images": [f"s3://bench/{qid}.tif"],
        "question": "q",
        "choices": ["(A) a", "(B) b", "(C) c", "(D) d"] if form == "mc" else [],
        "answer": answer,
        "form": form,
        "category": category,
        "subset": None,
        "prompt": "p",
        "bbox": None,
        "object_size_px": None,
        "small": small,
        "meta": json.dumps({"n_images": 1}),
    }


ITEMS = pa.Table.from_pylist(
    [
        _item("xlrs-lite", "1", COUNTING, "A"),
        _item("xlrs-lite", "2", COUNTING, "B"),
        _item("xlrs-lite", "3", LAND_USE, "AC"),
        _item("xlrs-lite", "4", LAND_USE, "BD"),
        _item("synthetic", "s-0", "object colour", "A", small=True),
        _item("synthetic", "s-1", "object colour", "red", form="open", small=False),
    ],
    schema=ITEM_SCHEMA,
)


def _answers(rows: list[tuple]) -> pa.Table:
    """Rows of (question_id, reply, strategy, budget, tokens_kept, tokens_dense, error)."""
    names = ("question_id", "answer", "strategy", "budget", "tokens_kept", "tokens_dense", "error")
    columns = list(zip(*rows, strict=True))
    types = (pa.string(), pa.string(), pa.string(), pa.int64(), pa.int64(), pa.int64(), pa.string())
    return pa.table({name: pa.array(values, type_) for name, values, type_ in zip(names, columns, types, strict=True)})


ANSWERS = _answers(
    [
        # dense baseline: everything right
        ("1", "A", "none", None, 2000, 2000, None),
        ("2", "The answer is (B)", "none", None, 2000, 2000, None),
        ("3", "A C", "none", None, 3000, 3000, None),
        ("4", "B D", "none", None, 3000, 3000, None),
        ("s-0", "A", "none", None, 1000, 1000, None),
        ("s-1", "Red", "none", None, 1000, 1000, None),
        # geollava at 64 tokens: one wrong, one error row, one item not answered at all (4)
        ("1", "A", "geollava", 64, 64, 2000, None),
        ("2", "C", "geollava", 64, 64, 2000, None),
        ("3", None, "geollava", 64, None, None, "CUDA out of memory"),
        ("s-0", "B", "geollava", 64, 64, 1000, None),
        ("s-1", "red", "geollava", 64, 64, 1000, None),
        # geollava at 256 tokens, XLRS only: the synthetic benchmark gets no run for it
        ("1", "A", "geollava", 256, 256, 2000, None),
        ("2", "B", "geollava", 256, 256, 2000, None),
        ("3", "C A", "geollava", 256, 256, 3000, None),
        ("4", "B", "geollava", 256, 256, 3000, None),
    ]
)


def test_report_files(tmp_path: Path, wordnet: WordNetCorpusReader) -> None:
    report = build_report(ITEMS, ANSWERS, str(tmp_path / "out"), wordnet=wordnet)
    assert [(r.source, r.label) for r in report.runs] == [
        ("synthetic", "geollava@64"),
        ("synthetic", "none"),
        ("xlrs-lite", "geollava@64"),
        ("xlrs-lite", "geollava@256"),
        ("xlrs-lite", "none"),
    ]
    data = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert data["benchmarks"] == ["synthetic", "xlrs-lite"]
    runs = {(run["source"], run["strategy"], run["budget"]): run for run in data["runs"]}

    dense = runs[("xlrs-lite", "none", None)]
    assert (dense["items"], dense["answered"], dense["errors"], dense["missing"]) == (4, 4, 0, 0)
    assert dense["headline"] == {"name": "w.Avg. accuracy", "value": 1.0}
    assert dense["mean_tokens_kept"] == 2500 and dense["kept_fraction"] == 1.0

    pruned = runs[("xlrs-lite", "geollava", 64)]
    assert (pruned["items"], pruned["answered"], pruned["errors"], pruned["missing"]) == (4, 2, 1, 1)
    # 1 right of 4: the error row and the missing item count as wrong
    assert pruned["headline"]["value"] == 0.25
    assert pruned["metrics"]["subtasks"][LAND_USE] == {"correct": 0, "total": 2, "accuracy": 0.0}
    assert pruned["mean_tokens_kept"] == 64 and pruned["mean_tokens_dense"] == 2000  # answered rows only

    half = runs[("xlrs-lite", "geollava", 256)]
    assert half["headline"]["value"] == 0.75
    assert half["metrics"]["macro"] == pytest.approx((1.0 + 0.5) / 13)

    synthetic = runs[("synthetic", "geollava", 64)]
    assert synthetic["headline"] == {"name": "accuracy", "value": 0.5}
    assert synthetic["metrics"]["small"]["accuracy"] == 0.0 and synthetic["metrics"]["large"]["accuracy"] == 1.0
    assert runs[("synthetic", "none", None)]["headline"]["value"] == 1.0  # "Red" == "red", lower-cased

    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert "## xlrs-lite" in markdown and "## synthetic" in markdown
    assert "| geollava | 64 | 4 | 2 | 1 | 1 | 64 | 2,000 | 3.2 | 25.0 |" in markdown
    assert "| none | — | 4 | 4 | 0 | 0 | 2,500 | 2,500 | 100.0 | 100.0 |" in markdown
    assert f"| {LAND_USE} | 0.0 | 50.0 | 100.0 |" in markdown
    assert "macro counts 11 sub-task(s) without items as 0" in markdown

    with Image.open(io.BytesIO((tmp_path / "out" / REPORT_PLOT).read_bytes())) as png:
        assert png.format == "PNG" and png.width > 600 and png.height > 300


def test_report_rejects_inconsistent_answers() -> None:
    with pytest.raises(ValueError, match="lacks column\\(s\\) tokens_dense"):
        join_answers(ITEMS, ANSWERS.drop_columns(["tokens_dense"]))
    unknown = _answers([("99", "A", "none", None, 1, 1, None)])
    with pytest.raises(ValueError, match="1 answer\\(s\\) to questions not among the items, e.g. \\['99'\\]"):
        join_answers(ITEMS, unknown)
    twice = _answers([("1", "A", "none", None, 1, 1, None), ("1", "B", "none", None, 1, 1, None)])
    with pytest.raises(ValueError, match="run \\('none', None\\) answers question xlrs-lite/1 more than once"):
        join_answers(ITEMS, twice)


def test_a_row_without_an_answer_or_an_error_counts_as_an_error() -> None:
    answers = _answers([("1", "A", "none", None, 10, 10, None), ("2", None, "none", None, 10, 10, None)])
    table = join_answers(ITEMS, answers)[("none", None)]
    assert table.column("status").to_pylist() == ["answered", "error", "missing", "missing"]
    assert table.column("reply").to_pylist() == ["A", None, None, None]
    (run,) = evaluate(ITEMS, answers).runs
    assert (run.source, run.answered, run.errors, run.missing) == ("xlrs-lite", 1, 1, 2)


def test_mean_tokens_average_the_answered_rows_only() -> None:
    # The error row reports 0 tokens kept (and 0 dense): it must not pull the means down.
    answers = _answers(
        [
            ("1", "A", "geollava", 64, 64, 2000, None),
            ("2", "B", "geollava", 64, 128, 4000, None),
            ("3", None, "geollava", 64, 0, 0, "CUDA out of memory"),
        ]
    )
    (run,) = evaluate(ITEMS, answers).runs
    assert (run.answered, run.errors, run.missing) == (2, 1, 1)
    assert run.mean_tokens_kept == 96 and run.mean_tokens_dense == 3000


def test_question_ids_shared_by_benchmarks_need_a_source_column() -> None:
    items = pa.concat_tables(
        [ITEMS, pa.Table.from_pylist([_item("mme-realworld-rs", "1", "color", "B")], schema=ITEM_SCHEMA)]
    )
    answers = _answers([("1", "B", "none", None, 10, 10, None)])
    with pytest.raises(ValueError, match="question id '1' exists in several benchmarks"):
        join_answers(items, answers)
    report = evaluate(items, answers.append_column("source", pa.array(["mme-realworld-rs"])))
    (run,) = report.runs
    assert (run.source, run.items, run.answered, run.score.headline) == ("mme-realworld-rs", 1, 1, 1.0)


def test_report_in_object_storage(s3_server, wordnet: WordNetCorpusReader) -> None:
    storage = s3_server.storage()
    out = f"s3://{s3_server.new_bucket('report')}/runs/r1"
    build_report(ITEMS, ANSWERS, out, storage=storage, wordnet=wordnet)
    fs = storage.filesystem(out)
    assert sorted(path.rsplit("/", 1)[1] for path in fs.ls(out)) == sorted([REPORT_JSON, REPORT_MD, REPORT_PLOT])
    assert json.loads(fs.cat(f"{out}/{REPORT_JSON}"))["benchmarks"] == ["synthetic", "xlrs-lite"]


def test_evidence_resolved_by_a_token_no_larger_than_the_object(tmp_path: Path, wordnet: WordNetCorpusReader) -> None:
    # Synthetic items with evidence: two small objects (20 px and 10 px boxes), one large (40 px),
    # one without a box, and a small object inside a larger region.
    boxes = {"e-0": [0.0, 0.0, 20.0, 8.0], "e-1": [50.0, 50.0, 60.0, 60.0], "e-2": [0.0, 0.0, 40.0, 40.0]}
    items = pa.Table.from_pylist(
        [
            {**_item("synthetic", qid, "object colour", "A", small=qid != "e-2"), "bbox": box}
            for qid, box in boxes.items()
        ]
        + [_item("synthetic", "e-3", "object colour", "A", small=True)]  # no bbox: not counted
        # a 12-px object in a 100-px region: the object's size is the bar, not the region's
        + [{**_item("synthetic", "e-4", "counting", "A", small=True), "bbox": [0.0, 0.0, 100.0, 100.0], "object_size_px": 12.0}],
        schema=ITEM_SCHEMA,
    )
    answers = _answers(
        [
            ("e-0", "A", "c2f", 256, 200, 9000, None),  # finest token 16 px <= 20: resolved
            ("e-1", "B", "c2f", 256, 200, 9000, None),  # 16 px > 10: blurred
            ("e-2", "A", "c2f", 256, 200, 9000, None),  # no kept token over it
            ("e-3", "A", "c2f", 256, 200, 9000, None),
            ("e-4", "A", "c2f", 256, 200, 9000, None),  # 16 px > 12
            ("e-0", "A", "downsample", 256, 256, 256, None),  # 64 px > 20
            ("e-1", None, "downsample", 256, None, None, "read failed"),  # not answered: not counted
            ("e-2", "A", "downsample", 256, 256, 256, None),  # 40 px <= 40
            ("e-3", "A", "downsample", 256, 256, 256, None),
            ("e-4", "B", "downsample", 256, 256, 256, None),  # 8 px <= 12 (and answered wrong)
        ]
    )
    answers = answers.append_column("evidence_tokens", pa.array([3, 2, 0, None, 5, 1, None, 1, None, 4], pa.int64()))
    answers = answers.append_column("evidence_px", pa.array([16.0, 16.0, None, None, 16.0, 64.0, None, 40.0, None, 8.0], pa.float64()))

    report = build_report(items, answers, str(tmp_path / "out"), wordnet=wordnet)
    runs = {run.strategy: run for run in report.runs}
    assert runs["c2f"].evidence_resolved == 0.25
    assert runs["c2f"].evidence_resolved_small == pytest.approx(1 / 3)
    assert runs["downsample"].evidence_resolved == pytest.approx(2 / 3)
    assert runs["downsample"].evidence_resolved_small == 0.5
    # Accuracy where resolved and small: c2f resolved only e-0 and answered it right; downsample only
    # e-4 (e-2, also resolved, is large), and answered it wrong.
    assert runs["c2f"].resolved_small_accuracy == 1.0
    assert runs["downsample"].resolved_small_accuracy == 0.0
    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert "| c2f | 256 | 5 | 5 | 0 | 0 | 200 | 9,000 | 2.2 | 25.0 | 33.3 | 100.0 |" in markdown
    assert "evidence resolved:" in markdown

    # Answers without the column (written before it existed): no evidence figures, no columns for them.
    plain = evaluate(items, answers.drop_columns(["evidence_tokens", "evidence_px"]), wordnet)
    assert all(run.evidence_resolved is None and run.resolved_small_accuracy is None for run in plain.runs)
