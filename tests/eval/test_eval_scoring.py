"""Scorers on hand-made items: every rule of each benchmark's published scoring, quirks included."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from uhr.eval.benchmarks import ITEM_SCHEMA, XLRS_SUBTASKS
from uhr.eval.scoring import (
    Accuracy,
    LrsVqaScore,
    MmeScore,
    SyntheticScore,
    XlrsScore,
    judge,
    lrs_vqa_correct,
    mme_correct,
    summarize,
    xlrs_correct,
)


ABCD = ["(A) a", "(B) b", "(C) c", "(D) d"]


def items(rows: list[dict]) -> pa.Table:
    """An item table (ITEM_SCHEMA) with a `reply` column, from partial rows."""
    full = []
    for k, row in enumerate(rows):
        full.append(
            {
                "question_id": row.get("question_id", str(k)),
                "source": row["source"],
                "images": ["scene.tif"] * row.get("n_images", 1),
                "question": "q",
                "choices": row.get("choices", ABCD if row.get("form", "mc") == "mc" else []),
                "answer": row["answer"],
                "form": row.get("form", "mc"),
                "category": row.get("category", "c"),
                "subset": row.get("subset"),
                "prompt": "p",
                "bbox": None,
                "object_size_px": None,
                "small": row.get("small"),
                "meta": json.dumps({"n_images": row.get("n_images", 1)}),
            }
        )
    table = pa.Table.from_pylist(full, schema=ITEM_SCHEMA)
    return table.append_column("reply", pa.array([row["reply"] for row in rows], pa.string()))


# --- XLRS-Bench -------------------------------------------------------------------------------

LAND_USE = "Land use classification/Overall Land use classification"


def xlrs(category: str, answer: str, reply: str | None) -> dict:
    return {"source": "xlrs-lite", "category": category, "answer": answer, "reply": reply}

COUNTING = "Counting/Overall counting"
COLOUR = "Object properties/Object color"


@pytest.mark.parametrize(
    ("reply", "answer", "correct"),
    [
        ("B", "B", True),
        ("The answer is (B)", "B", True),
        ("(b)", "B", False),  # lower case alone names no letter
        ("Answer: (b)", "B", True),
        ("b", "B", False),
        ("", "B", False),
        ("harbour", "B", False),
        ("B. There are two ships.", "B", False),  # verbose: its words add letters
        ("A C", "AC", True),  # multi-answer land use, in any order / separator
        ("C, A", "AC", True),
        ("A", "AC", False),  # a subset is wrong
        ("A C D", "AC", False),
        ("A and C", "AC", False),  # "and" adds A and D
    ],
)
def test_xlrs_item_rule(reply: str, answer: str, correct: bool) -> None:
    assert xlrs_correct(reply, answer) is correct


def test_xlrs_micro_macro_and_subtasks() -> None:
    rows = [
        # counting: 2 of 3 right
        {"source": "xlrs-lite", "category": COUNTING, "answer": "B", "reply": "B"},
        {"source": "xlrs-lite", "category": COUNTING, "answer": "C", "reply": "The answer is (C)"},
        {"source": "xlrs-lite", "category": COUNTING, "answer": "D", "reply": "d"},
        # land use: 1 of 2 right
        {"source": "xlrs-lite", "category": LAND_USE, "answer": "AC", "reply": "C A"},
        {"source": "xlrs-lite", "category": LAND_USE, "answer": "BD", "reply": "B"},
        # colour: 0 of 1, its reply missing (no answer row)
        {"source": "xlrs-lite", "category": COLOUR, "answer": "A", "reply": None, "n_images": 2},
    ]
    judged = judge(items(rows))
    assert judged.column("correct").to_pylist() == [True, True, False, True, False, False]
    assert judged.column("prediction").to_pylist() == ["B", "C", "", "AC", "B", None]
    score = summarize(judged, "xlrs-lite")
    assert isinstance(score, XlrsScore)
    assert score.overall == Accuracy(3, 6)
    assert score.micro == pytest.approx(0.5) and score.headline == score.micro
    # macro: mean over all 13 sub-tasks, the 10 without items counting 0 (as lmms-eval does)
    assert score.macro == pytest.approx((2 / 3 + 1 / 2 + 0) / 13)
    assert len(score.subtasks_without_items) == 10
    assert score.subtasks == {COUNTING: Accuracy(2, 3), LAND_USE: Accuracy(1, 2), COLOUR: Accuracy(0, 1)}
    assert list(score.subtasks) == [name for name in XLRS_SUBTASKS if name in score.subtasks]  # published order
    assert score.tasks["Counting"] == Accuracy(2, 3)
    assert score.multi_image_items == 1
    assert any("asked of all of them" in note for note in score.notes())
    as_json = json.loads(json.dumps(score.to_dict()))
    assert as_json["subtasks"][COUNTING] == {"correct": 2, "total": 3, "accuracy": 2 / 3}


def test_xlrs_macro_over_all_subtasks_is_the_mean_of_subtask_accuracies() -> None:
    rows = []
    for k, name in enumerate(XLRS_SUBTASKS):
        # sub-task k has k + 1 items, the first of which is right
        rows += [xlrs(name, "A", "A" if j == 0 else "B") for j in range(k + 1)]
    score = summarize(judge(items(rows)), "xlrs-lite")
    assert score.subtasks_without_items == []
    assert score.macro == pytest.approx(sum(1 / (k + 1) for k in range(13)) / 13)
    assert score.micro == pytest.approx(13 / sum(range(1, 14)))
    assert score.notes() == []


def test_xlrs_rejects_unknown_categories() -> None:
    with pytest.raises(ValueError, match="unknown XLRS-Bench categories \\['Counting/Ships'\\]"):
        summarize(judge(items([xlrs("Counting/Ships", "A", "A")])), "xlrs-lite")


@given(st.lists(st.tuples(st.sampled_from(XLRS_SUBTASKS), st.booleans()), min_size=1, max_size=40))
def test_xlrs_micro_is_the_item_weighted_mean_of_subtasks(outcomes: list[tuple[str, bool]]) -> None:
    rows = [xlrs(name, "A", "A" if ok else "B") for name, ok in outcomes]
    score = summarize(judge(items(rows)), "xlrs-lite")
    weighted = sum(acc.value * acc.total for acc in score.subtasks.values()) / len(outcomes)
    assert score.micro == pytest.approx(weighted)
    assert 0.0 <= score.macro <= 1.0
    assert sum(acc.total for acc in score.subtasks.values()) == len(outcomes)


# --- MME-RealWorld ----------------------------------------------------------------------------

MME_CHOICES = ["(A) Red", "(B) Yellow", "(C) Gray", "(D) White", "(E) None of the above"]


@pytest.mark.parametrize(
    ("reply", "answer", "correct"),
    [
        ("D", "D", True),
        ("The best answer is (D)", "D", True),
        ("white", "D", True),  # looked up in the option texts
        ("Blue", "B", True),  # the first upper-case A-E, here the B of "Blue" (as published)
        ("Gray", "C", True),  # no upper-case A-E in "Gray": found in option C's text
        ("yel", "B", True),  # any substring of an option's text
        ("", "A", True),  # an empty reply selects the first option (as published)
        ("purple", "A", False),
        ("it is hard to tell what colour the roof of that building is", "A", False),
    ],
)
def test_mme_item_rule(reply: str, answer: str, correct: bool) -> None:
    assert mme_correct(reply, answer, MME_CHOICES) is correct


def test_mme_categories_mean_and_overall() -> None:
    rows = [
        {"source": "mme-realworld-rs", "category": "color", "answer": "D", "reply": "D", "choices": MME_CHOICES},
        {"source": "mme-realworld-rs", "category": "color", "answer": "C", "reply": "gray", "choices": MME_CHOICES},
        {"source": "mme-realworld-rs", "category": "count", "answer": "A", "reply": "B", "choices": MME_CHOICES},
        {"source": "mme-realworld-rs", "category": "position", "answer": "E", "reply": "(E)", "choices": MME_CHOICES},
        {"source": "mme-realworld-rs", "category": "position", "answer": "B", "reply": None, "choices": MME_CHOICES},
    ]
    judged = judge(items(rows))
    assert judged.column("prediction").to_pylist() == ["D", "C", "B", "E", None]
    score = summarize(judged, "mme-realworld-rs")
    assert isinstance(score, MmeScore)
    assert score.categories == {"color": Accuracy(2, 2), "count": Accuracy(0, 1), "position": Accuracy(1, 2)}
    assert score.mean == pytest.approx((1 + 0 + 0.5) / 3) and score.headline == score.mean
    assert score.overall == Accuracy(3, 5)


# --- LRS-VQA ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "truth", "correct"),
    [
        ("gray", "gray", True),
        ("Gray", "gray", True),  # lower-cased
        (" Gray\n", "gray", True),  # surrounding whitespace (stripped at inference by LRS-VQA)
        ("grey", "gray", True),  # WordNet synonym
        ("two", "2", True),
        ("2", "two", True),
        ("Gray.", "gray", False),  # trailing punctuation is not stripped
        ("gray color", "gray", False),
        ("ship", "boat", False),
        ("", "yes", False),
        ("rural", "Rural", True),  # the truth is lower-cased too
    ],
)
def test_lrs_vqa_item_rule(wordnet: WordNetCorpusReader, reply: str, truth: str, correct: bool) -> None:
    assert lrs_vqa_correct(reply, truth, wordnet) is correct


def test_lrs_vqa_per_source_oa_aa_and_pooled(wordnet: WordNetCorpusReader) -> None:
    def item(qid: str, category: str, truth: str, reply: str | None) -> dict:
        subset = qid.split("_")[0]
        return {"question_id": qid, "source": "lrs-vqa", "form": "open", "category": category, "subset": subset,
                "answer": truth, "reply": reply}  # fmt: skip

    rows = [
        item("FAIR_1", "count", "2", "two"),
        item("FAIR_2", "count", "3", "4"),
        item("FAIR_3", "object color", "white", "White"),
        item("STAR_1", "object color", "gray", "grey"),
        item("STAR_2", "reasoning", "yes", "Yes."),
        item("STAR_3", "reasoning", "no", None),
        item("GLH-Bridge_1", "rural or urban", "rural", "rural"),
    ]
    judged = judge(items(rows), wordnet)
    assert judged.column("correct").to_pylist() == [True, False, True, True, False, False, True]
    assert judged.column("prediction").to_pylist() == ["two", "4", "white", "grey", "yes.", None, "rural"]
    score = summarize(judged, "lrs-vqa")
    assert isinstance(score, LrsVqaScore)
    assert list(score.subsets) == ["FAIR", "GLH-Bridge", "STAR"]
    fair = score.subsets["FAIR"]
    assert fair.categories == {"count": Accuracy(1, 2), "object color": Accuracy(1, 1)}
    assert fair.oa == pytest.approx(2 / 3)
    assert fair.aa == pytest.approx((0.5 + 1.0) / 2)
    star = score.subsets["STAR"]
    assert (star.oa, star.aa) == (pytest.approx(1 / 3), pytest.approx((1.0 + 0.0) / 2))
    assert score.subsets["GLH-Bridge"].oa == 1.0
    assert score.pooled.overall == Accuracy(4, 7) and score.headline == pytest.approx(4 / 7)
    assert score.pooled.categories["object color"] == Accuracy(2, 2)
    columns = score.summary_columns()
    assert columns["FAIR AA"] == pytest.approx(0.75) and columns["pooled OA"] == pytest.approx(4 / 7)
    assert score.breakdown()["STAR / reasoning"] == 0.0


# --- synthetic --------------------------------------------------------------------------------


def test_synthetic_overall_categories_and_object_size(wordnet: WordNetCorpusReader) -> None:
    def item(form: str, category: str, answer: str, reply: str, small: bool | None) -> dict:
        fields = {"form": form, "category": category, "answer": answer, "reply": reply, "small": small}
        return {"source": "synthetic", **fields}

    rows = [
        item("mc", "object colour", "A", "A", True),
        item("mc", "object colour", "B", "C", True),
        item("open", "object colour", "grey", "gray", False),
        item("open", "overall counting", "2", "3", None),
        item("mc", "overall counting", "D", "(D)", None),
    ]
    score = summarize(judge(items(rows), wordnet), "synthetic")
    assert isinstance(score, SyntheticScore)
    assert score.overall == Accuracy(3, 5) and score.headline == pytest.approx(0.6)
    assert score.categories == {"object colour": Accuracy(2, 3), "overall counting": Accuracy(1, 2)}
    assert score.small == Accuracy(1, 2) and score.large == Accuracy(1, 1)  # unknown sizes in neither
    assert score.forms == {"mc": Accuracy(2, 3), "open": Accuracy(1, 2)}


def test_summarize_refuses_items_of_another_benchmark() -> None:
    judged = judge(items([{"source": "xlrs-lite", "category": COUNTING, "answer": "A", "reply": "A"}]))
    with pytest.raises(ValueError, match="summarize\\('mme-realworld-rs'\\) got items of \\['xlrs-lite'\\]"):
        summarize(judged, "mme-realworld-rs")
    with pytest.raises(ValueError, match="judge needs column\\(s\\) reply"):
        judge(judged.drop_columns(["reply"]))


def test_accuracy_of_nothing_is_none() -> None:
    assert Accuracy(0, 0).value is None
    assert Accuracy(0, 0).to_dict() == {"correct": 0, "total": 0, "accuracy": None}
