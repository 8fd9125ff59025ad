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



def _apart(a, b) -> dict[str, bool]:
    """Direction word -> whether object `a`'s box lies wholly on that side of `b`'s."""
    return {
        "left": a.bbox[2] <= b.bbox[0],
        "right": a.bbox[0] >= b.bbox[2],
        "above": a.bbox[3] <= b.bbox[1],
        "below": a.bbox[1] >= b.bbox[3],
    }


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
        assert q.bbox == [float(v) for v in obj.bbox]  # the evidence is the object, not the region around it
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
        assert _apart(a, b)[q.answer_text]
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
    if regions and category not in (Category.SPATIAL_RELATION, Category.OBJECT_COLOUR, Category.OBJECT_CLASS):
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


def check_scene_question(q: Question, truth: SceneTruth) -> None:
    """A scene-referent question with fixed options, re-derived from the truth: its referent is
    unique in the scene, its answer is the truth's, its options are in the category's fixed order."""
    assert not boxes(q.question), "scene referents name no pixel box"
    assert q.question.endswith(" in the image?")
    objects = truth.objects
    category = Category(q.category)
    texts = [c[4:] for c in q.choices]
    assert [c[:4] for c in q.choices] == [f"({letter}) " for letter in "ABCDE"[: len(q.choices)]]
    assert texts[ord(q.answer) - ord("A")] == q.answer_text
    if category is Category.OVERALL_COUNTING:
        members = [o for o in objects if o.cls is plural_class(q.question)]
        assert q.answer_text == str(len(members))
        assert texts == sorted(texts, key=int)
        return
    order = {
        Category.OBJECT_COLOUR: COLOURS,
        Category.OBJECT_CLASS: tuple(c.value for c in OBJECT_CLASSES),
        Category.REGIONAL_LAND_USE: tuple(c.value for c in LAND_COVERS),
        Category.PRESENCE: ("yes", "no"),
        Category.SPATIAL_RELATION: ("left", "right", "above", "below"),
    }[category]
    # Every label of the category, in its order; past five labels, the answer and four others.
    assert texts == [label for label in order if label in texts] and len(texts) == min(len(order), 5)
    described = re.findall(rf"(red|blue|white|yellow|green|orange) ({CLASS_NAMES})\b", q.question)
    if category is Category.OBJECT_COLOUR:
        name = re.search(rf"the ({CLASS_NAMES})s? in the image", q.question).group(1)  # type: ignore[union-attr]
        members = [o for o in objects if o.cls.value == name]
        assert members and {o.colour for o in members} == {q.answer_text}
        assert (len(members) == 1) == (f"the {name} in" in q.question)
        assert q.object_size_px == min(o.size_px for o in members)
    elif category is Category.OBJECT_CLASS:
        colour = re.search(r"the (\w+) object in the image", q.question).group(1)  # type: ignore[union-attr]
        (obj,) = [o for o in objects if o.colour == colour]
        assert q.answer_text == obj.cls.value and q.object_size_px == obj.size_px
    elif category is Category.PRESENCE:
        ((colour, name),) = described
        members = [o for o in objects if o.colour == colour and o.cls.value == name]
        of_class = [o for o in objects if o.cls.value == name]
        assert q.answer_text == ("yes" if members else "no")
        # The class is always in the scene; a pair (yes and no) is about its objects and takes the smallest's size.
        assert of_class and q.object_size_px == min(o.size_px for o in of_class)
    elif category is Category.REGIONAL_LAND_USE:
        labels = truth.landcover.labels(0, 0, truth.width, truth.height)
        shares = np.sort(np.bincount(labels.ravel(), minlength=len(LAND_COVERS)) / labels.size)
        dominant = LAND_COVERS[int(np.bincount(labels.ravel(), minlength=len(LAND_COVERS)).argmax())].value
        assert q.answer_text == dominant and shares[-1] - shares[-2] >= 0.05
    else:
        assert category is Category.SPATIAL_RELATION
        (a,), (b,) = ([o for o in objects if (o.colour, o.cls.value) == kind] for kind in described)
        assert _apart(a, b)[q.answer_text]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(512, 1400))
def test_scene_referent_questions_agree_with_the_truth(seed: int, size: int) -> None:
    truth = plan_scene(size, seed)
    questions = generate_questions(truth, "scenes/scene_0000.tif", 16, open_fraction=0.0, referents="scene", option_order="fixed")
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        check_scene_question(q, truth)


def test_fixed_options_give_each_label_one_letter_and_leave_regions_unchanged() -> None:
    questions = [
        q
        for seed in range(16)
        for q in generate_questions(plan_scene(1024, seed), f"scenes/s{seed}.tif", 16, open_fraction=0.0, referents="scene", option_order="fixed")
    ]
    letters: dict[str, set[str]] = {}
    for q in questions:
        if q.category in (Category.OBJECT_CLASS.value, Category.PRESENCE.value, Category.SPATIAL_RELATION.value):
            letters.setdefault(q.answer_text, set()).add(q.answer)
    assert letters and all(len(found) == 1 for found in letters.values()), letters
    # Small objects decide a good share of the scene questions, as on the region benchmark.
    assert 0.2 <= sum(q.small for q in questions) / len(questions) <= 0.8
    # The region (XLRS) questions are unchanged by the new arguments' defaults.
    truth = plan_scene(1024, 5)
    assert generate_questions(truth, "scenes/a.tif", 12) == generate_questions(
        truth, "scenes/a.tif", 12, referents="region", option_order="shuffled"
    )


@pytest.mark.parametrize("referents", ["scene", "region"])
def test_presence_words_do_not_tell_the_answer(referents: str) -> None:
    """Each class is asked about as often with "yes" as with "no" in every scene; colours nearly so across scenes."""
    asked = [
        q
        for seed in range(48)
        for q in generate_questions(plan_scene(1024, seed), f"scenes/s{seed}.tif", 16, open_fraction=0.0, referents=referents, option_order="fixed")
        if q.category == Category.PRESENCE.value
    ]
    assert len(asked) >= 100
    names = re.compile(rf"\b({'|'.join(c.value for c in OBJECT_CLASSES)})\b")
    per_scene_class: Counter = Counter()
    for q in asked:
        per_scene_class[q.scene, names.search(q.question).group(1)] += 1 if q.answer_text == "yes" else -1  # type: ignore[union-attr]
    assert set(per_scene_class.values()) == {0}, per_scene_class
    # A pair is small or large together, so the small-object breakdown is balanced as well.
    small = Counter(q.answer_text for q in asked if q.small)
    assert small["yes"] == small["no"] >= 10, small
    if referents == "scene":
        colours = re.compile(r"(red|blue|white|yellow|green|orange) ")
        by_colour: dict[str, list[bool]] = {}
        for q in asked:
            by_colour.setdefault(colours.search(q.question).group(1), []).append(q.answer_text == "yes")  # type: ignore[union-attr]
        rates = {colour: sum(yes) / len(yes) for colour, yes in by_colour.items()}
        assert len(rates) == 6 and all(0.3 <= rate <= 0.7 for rate in rates.values()), rates


def test_count_options_do_not_point_at_the_answer() -> None:
    """Four consecutive counts in ascending order, the answer at a uniformly drawn place (counts of 3 or more:
    below that a window reaching under zero starts at zero)."""
    places: Counter = Counter()
    for seed in range(64):
        for q in generate_questions(plan_scene(1024, seed), f"scenes/s{seed}.tif", 16, open_fraction=0.0, referents="scene", option_order="fixed"):
            if not q.category.startswith("Counting"):
                continue
            values = [int(c[4:]) for c in q.choices]
            assert np.diff(values).tolist() == [1, 1, 1] and int(q.answer_text) in values, q.choices
            if int(q.answer_text) >= 3:
                places[q.answer] += 1
    assert sum(places.values()) >= 60
    expected = sum(places.values()) / 4
    assert all(abs(places[letter] - expected) <= 0.5 * expected for letter in "ABCD"), places
