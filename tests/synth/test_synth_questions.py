"""Questions agree with the truth they were drawn from, checked independently of how they were made."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uhr.synth import Category, SceneTruth, generate_questions, plan_scene
from uhr.synth.landcover import LAND_COVERS
from uhr.synth.objects import COLOURS, OBJECT_CLASSES, ObjectClass, SceneObject
from uhr.prompts import XLRS_INSTRUCTION
from uhr.synth.questions import Question

BOX = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")
CLASS_NAMES = "|".join(sorted((c.value for c in ObjectClass), key=len, reverse=True))


def boxes(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in match) for match in BOX.findall(text)]  # type: ignore[misc]


def inside(obj: SceneObject, box: tuple[int, int, int, int]) -> bool:
    return box[0] <= obj.bbox[0] and box[1] <= obj.bbox[1] and obj.bbox[2] <= box[2] and obj.bbox[3] <= box[3]


def meets(obj: SceneObject, box: tuple[int, int, int, int]) -> bool:
    return obj.bbox[0] < box[2] and box[0] < obj.bbox[2] and obj.bbox[1] < box[3] and box[1] < obj.bbox[3]


def plural_class(text: str) -> ObjectClass:
    name = re.search(rf"How many ({CLASS_NAMES})s ", text).group(1)  # type: ignore[union-attr]
    return ObjectClass(name)


def check_question(q: Question, truth: SceneTruth) -> None:
    """Every claim a question makes, re-derived from the truth."""
    # Form: lettered, unique options; the letter points at the answer text.
    if q.form == "mc":
        assert len(q.choices) in (2, 4)
        letters = [c[1] for c in q.choices]
        assert letters == list("ABCD"[: len(q.choices)])
        texts = [c[4:] for c in q.choices]
        assert all(c.startswith(f"({c[1]}) ") for c in q.choices)
        assert len(set(texts)) == len(texts)
        assert texts[letters.index(q.answer)] == q.answer_text
    else:
        assert q.form == "open" and q.choices == [] and q.answer == q.answer_text
    assert q.small == (q.object_size_px is not None and q.object_size_px < 32)
    regions = boxes(q.question)
    for box in regions:
        assert 0 <= box[0] < box[2] <= truth.width and 0 <= box[1] < box[3] <= truth.height
    objects = truth.objects
    category = Category(q.category)
    if category is Category.OVERALL_COUNTING:
        cls = plural_class(q.question)
        members = [o for o in objects if o.cls is cls]
        assert q.answer_text == str(len(members)) and q.bbox is None
    elif category is Category.REGIONAL_COUNTING:
        (box,) = regions
        cls = plural_class(q.question)
        # The region cuts no object, so containment, overlap and centre rules agree.
        assert all(inside(o, box) for o in objects if meets(o, box))
        members = [o for o in objects if o.cls is cls and inside(o, box)]
        assert q.answer_text == str(len(members))
        assert q.object_size_px == (min(o.size_px for o in members) if members else None)
    elif category in (Category.OBJECT_COLOUR, Category.OBJECT_CLASS):
        (box,) = regions
        (obj,) = [o for o in objects if meets(o, box)]
        assert inside(obj, box) and q.object_size_px == obj.size_px
        if category is Category.OBJECT_COLOUR:
            assert f"the {obj.cls.value} in" in q.question and q.answer_text == obj.colour
            assert truth.bands >= 3
        else:
            assert q.answer_text == obj.cls.value
    elif category is Category.REGIONAL_LAND_USE:
        (box,) = regions
        labels = truth.landcover.labels(box[0], box[1], box[2] - box[0], box[3] - box[1])
        shares = np.bincount(labels.ravel(), minlength=len(LAND_COVERS)) / labels.size
        assert shares.max() >= 0.75 and q.answer_text == LAND_COVERS[int(shares.argmax())].value
    elif category is Category.SPATIAL_RELATION:
        first, second = regions
        (a,) = [o for o in objects if tuple(o.bbox) == first]
        (b,) = [o for o in objects if tuple(o.bbox) == second]
        apart = {
            "left": a.bbox[2] <= b.bbox[0],
            "right": a.bbox[0] >= b.bbox[2],
            "above": a.bbox[3] <= b.bbox[1],
            "below": a.bbox[1] >= b.bbox[3],
        }
        assert apart[q.answer_text]
        # Not ambiguous: the boxes are not also apart along the other axis' direction pair.
        horizontal = q.answer_text in ("left", "right")
        dx = abs(a.bbox[0] + a.bbox[2] - b.bbox[0] - b.bbox[2])
        dy = abs(a.bbox[1] + a.bbox[3] - b.bbox[1] - b.bbox[3])
        assert (dx >= 2 * dy) if horizontal else (dy >= 2 * dx)
        if truth.bands >= 3:
            assert f"the {a.colour} {a.cls.value} in" in q.question and f"the {b.colour} {b.cls.value} in" in q.question
        assert q.object_size_px == min(a.size_px, b.size_px)
    elif category is Category.PRESENCE:
        (box,) = regions
        cls = ObjectClass(re.search(rf"Is there a ({CLASS_NAMES}) in", q.question).group(1))  # type: ignore[union-attr]
        assert all(inside(o, box) for o in objects if meets(o, box))
        present = any(o.cls is cls and inside(o, box) for o in objects)
        assert q.answer_text == ("yes" if present else "no")
    if regions and category is not Category.SPATIAL_RELATION:
        assert q.bbox == [float(v) for v in regions[0]]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(256, 1400),
    height=st.integers(256, 1400),
    bands=st.sampled_from([1, 3]),
)
def test_every_question_agrees_with_the_truth(seed: int, width: int, height: int, bands: int) -> None:
    truth = plan_scene((width, height), seed, bands=bands)
    questions = generate_questions(truth, "scenes/scene_0000.tif", 16, open_fraction=0.3)
    assert len({q.question for q in questions}) == len(questions)
    assert [q.question_id for q in questions] == [f"scene_0000_q{k:03d}" for k in range(len(questions))]
    for q in questions:
        check_question(q, truth)
        assert q.scene == "scenes/scene_0000.tif" and q.seed == seed
    if bands == 1:
        assert Category.OBJECT_COLOUR.value not in {q.category for q in questions}


def test_questions_are_deterministic_and_differ_across_seeds() -> None:
    truth = plan_scene(1024, 21)
    first = generate_questions(truth, "scenes/a.tif", 12)
    assert first == generate_questions(plan_scene(1024, 21), "scenes/a.tif", 12)
    assert [q.question for q in first] != [q.question for q in generate_questions(plan_scene(1024, 22), "scenes/a.tif", 12)]


def test_small_training_scenes_still_get_the_full_question_mix() -> None:
    questions: list[Question] = []
    truths = [plan_scene(1024, seed) for seed in range(12)]
    for k, truth in enumerate(truths):
        asked = generate_questions(truth, f"scenes/scene_{k:04d}.tif", 12, open_fraction=0.25)
        assert len(asked) == 12
        questions.extend(asked)
    # Objects of every class turn up in small scenes, a few to a few dozen per scene.
    counts = [len(t.objects) for t in truths]
    assert min(counts) >= 3 and max(counts) <= 80
    assert {o.cls for t in truths for o in t.objects} == set(OBJECT_CLASSES)
    assert {o.colour for t in truths for o in t.objects} == set(COLOURS)
    categories = Counter(q.category for q in questions)
    assert set(categories) == {c.value for c in Category}
    # Options shuffled: each letter is the answer of a fair share of multiple-choice questions.
    letters = Counter(q.answer for q in questions if q.form == "mc" and len(q.choices) == 4)
    assert set(letters) == set("ABCD") and min(letters.values()) >= 0.1 * sum(letters.values())
    forms = Counter(q.form for q in questions)
    assert 0.1 <= forms["open"] / len(questions) <= 0.4
    assert any(q.small for q in questions) and any(q.object_size_px and not q.small for q in questions)
    assert Counter(q.answer_text for q in questions if q.category == Category.PRESENCE.value).keys() == {"yes", "no"}


def test_prompts_use_the_xlrs_and_llava_layouts() -> None:
    questions = generate_questions(plan_scene(1024, 3), "scenes/scene_0000.tif", 12, open_fraction=0.5)
    mc = next(q for q in questions if q.form == "mc")
    assert mc.prompt() == mc.question + "The choices are listed below:\n" + "\n".join(mc.choices) + "\n" + XLRS_INSTRUCTION
    assert mc.prompt().endswith("(A, B, C, D).\nThe answer is:")
    open_question = next(q for q in questions if q.form == "open")
    assert open_question.prompt() == open_question.question + "\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize(("count", "fraction", "message"), [(-1, 0.2, "count"), (4, 1.5, "open_fraction")])
def test_bad_arguments_are_refused(count: int, fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_questions(plan_scene(256, 0), "scenes/a.tif", count, open_fraction=fraction)
