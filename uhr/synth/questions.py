"""Questions about a synthetic scene, with answers read off its ground truth.

Categories follow XLRS-Bench's "Task/Subtask" names where XLRS has one (overall and regional
counting, object colour and class, regional land use, spatial relationship) plus object presence.
A question is multiple choice (XLRS style: options "(A) ...", answer a letter) or open (LRS-VQA
style: a single word or phrase). Regions are written "[x1, y1, x2, y2]" in scene pixels, as
XLRS-Bench and LRS-VQA write boxes.

Every region is settled before it is asked about: it grows until no object straddles its border,
so "how many ... in the region" has one answer whichever rule (centre, overlap, containment) a
reader has in mind.

Objects are referred to in one of two ways (`Referents`): by a region's box, as the benchmarks do,
or by what the scene itself makes unique ("the plane in the image" when there is one plane, "the
red object" when one object is red). The second asks the same things without coordinates to read,
which is what a small model trained from scratch can learn in an hour (the demo model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np

from uhr.prompts import OPEN_INSTRUCTION, xlrs_prompt
from uhr.synth.landcover import LAND_COVERS
from uhr.synth.objects import COLOURS, OBJECT_CLASSES, ObjectClass, SceneObject
from uhr.synth.scene import SceneTruth


class Category(str, Enum):
    """Question categories, as "Task/Subtask" like XLRS-Bench's `category` field."""

    OVERALL_COUNTING = "Counting/Overall counting"
    REGIONAL_COUNTING = "Counting/Regional counting"
    OBJECT_COLOUR = "Object properties/Object color"
    OBJECT_CLASS = "Object properties/Object classification"
    REGIONAL_LAND_USE = "Land use classification/Regional Land use classification"
    SPATIAL_RELATION = "Object spatial relationship/Object spatial relationship"
    PRESENCE = "Object presence/Object presence"


class Referents(str, Enum):
    """How a question names what it asks about: a region's box, or a description unique in the scene."""

    REGION = "region"
    SCENE = "scene"


class OptionOrder(str, Enum):
    """Multiple-choice options shuffled (XLRS style), or in one fixed order per category.

    Fixed: a category's labels (colours, classes, land covers, yes/no, directions) are offered in
    their canonical order, all of them up to five (the letters A-E), so a letter names the same
    label in every question of the category; counts are offered in ascending order.
    """

    SHUFFLED = "shuffled"
    FIXED = "fixed"


class Form(str, Enum):
    """Multiple choice (answer: a letter) or open (answer: a word or phrase)."""

    MC = "mc"
    OPEN = "open"


# Relative frequency of each category in a scene's questions.
CATEGORY_WEIGHTS: dict[Category, float] = {
    Category.OVERALL_COUNTING: 1.0,
    Category.REGIONAL_COUNTING: 3.0,
    Category.OBJECT_COLOUR: 2.0,
    Category.OBJECT_CLASS: 2.0,
    Category.REGIONAL_LAND_USE: 2.0,
    Category.SPATIAL_RELATION: 2.0,
    # Presence questions come in pairs (one "yes", one "no"), so half the weight gives the same share.
    Category.PRESENCE: 1.0,
}
# Scene-referent questions: more weight where small objects decide the answer.
SCENE_CATEGORY_WEIGHTS: dict[Category, float] = {
    Category.OVERALL_COUNTING: 1.0,
    Category.OBJECT_COLOUR: 3.0,
    Category.OBJECT_CLASS: 3.0,
    Category.REGIONAL_LAND_USE: 1.5,
    Category.SPATIAL_RELATION: 1.5,
    Category.PRESENCE: 1.5,
}
# A scene's dominant land cover is asked about only when it leads the runner-up by this share.
DOMINANT_MARGIN = 0.05
# Objects below this size (px) count as small, as in LRS-VQA's size bins.
SMALL_OBJECT_PX = 32.0
LETTERS = "ABCDE"
DIRECTIONS = ("left", "right", "above", "below")
YES_NO = ("yes", "no")
# Tries per question before a category is given up for the scene.
TRIES = 24
_QUESTION_STREAM = 3


@dataclass
class Question:
    """One row of the questions table."""

    question_id: str
    scene: str
    question: str
    choices: list[str]
    answer: str
    answer_text: str
    category: str
    bbox: list[float] | None
    object_size_px: float | None
    small: bool
    form: str
    seed: int

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    def prompt(self) -> str:
        """The full prompt a model sees (`question_prompt`)."""
        return question_prompt(self.question, self.choices, self.form)


def question_prompt(question: str, choices: list[str], form: str) -> str:
    """What training and evaluation show the model: XLRS's layout for multiple choice, LLaVA's
    short-answer instruction for open questions."""
    return xlrs_prompt(question, choices) if form == Form.MC.value else question + OPEN_INSTRUCTION


@dataclass(frozen=True)
class _Item:
    """A question before its form is chosen: the candidate answers, correct one first."""

    category: Category
    question: str
    options: tuple[str, ...]
    bbox: tuple[float, float, float, float] | None
    object_size_px: float | None
    # The category's labels in their canonical order (none for counts).
    labels: tuple[str, ...] = ()


class SceneIndex:
    """The truth's objects as arrays, for region queries (built once per scene)."""

    def __init__(self, truth: SceneTruth):
        self.truth = truth
        self.objects = truth.objects
        self.boxes = np.asarray([obj.bbox for obj in truth.objects], dtype=np.int64).reshape(-1, 4)
        self.classes = np.asarray([OBJECT_CLASSES.index(obj.cls) for obj in truth.objects], dtype=np.int64)

    def inside(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """Mask of the objects lying wholly inside `box` (x0, y0, x1, y1)."""
        b = self.boxes
        return (b[:, 0] >= box[0]) & (b[:, 1] >= box[1]) & (b[:, 2] <= box[2]) & (b[:, 3] <= box[3])

    def meeting(self, box: tuple[int, int, int, int]) -> np.ndarray:
        b = self.boxes
        return (b[:, 0] < box[2]) & (b[:, 2] > box[0]) & (b[:, 1] < box[3]) & (b[:, 3] > box[1])

    def settle(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """`box` clipped to the scene and grown until every object it touches lies inside it."""
        x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(self.truth.width, box[2]), min(self.truth.height, box[3])
        while True:
            cut = self.meeting((x0, y0, x1, y1)) & ~self.inside((x0, y0, x1, y1))
            if not cut.any():
                return x0, y0, x1, y1
            b = self.boxes[cut]
            x0, y0 = min(x0, int(b[:, 0].min())), min(y0, int(b[:, 1].min()))
            x1, y1 = max(x1, int(b[:, 2].max())), max(y1, int(b[:, 3].max()))

    def region_around(self, box: tuple[int, int, int, int], rng: np.random.Generator, reach: float) -> tuple[int, int, int, int]:
        """A settled region holding `box`, each side pushed out by up to `reach` px."""
        pad = rng.uniform(0.1, 1.0, size=4) * reach
        grown = (box[0] - pad[0], box[1] - pad[1], box[2] + pad[2], box[3] + pad[3])
        return self.settle((int(np.floor(grown[0])), int(np.floor(grown[1])), int(np.ceil(grown[2])), int(np.ceil(grown[3]))))

    def alone(self, index: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A region around object `index` that no other object touches."""
        obj = self.objects[index]
        margin = max(1, int(rng.uniform(0.2, 2.0) * obj.size_px))
        others = np.ones(len(self.objects), dtype=bool)
        others[index] = False
        while True:
            x0, y0, x1, y1 = obj.bbox
            box = (max(0, x0 - margin), max(0, y0 - margin), min(self.truth.width, x1 + margin), min(self.truth.height, y1 + margin))
            # Objects keep a few pixels apart, so a one-pixel margin always ends the loop.
            if margin == 1 or not (self.meeting(box) & others).any():
                return box
            margin = max(1, margin // 2)


def _box_text(box: tuple[int, int, int, int]) -> str:
    return f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"


def _plural(cls: ObjectClass) -> str:
    return cls.value + "s"


def _describe(obj: SceneObject, with_colour: bool) -> str:
    return f"{obj.colour} {obj.cls.value}" if with_colour else obj.cls.value


def _count_options(count: int, rng: np.random.Generator) -> tuple[str, ...]:
    """The count and three wrong counts: four consecutive values, the answer at a random place.

    The answer's place among the four is drawn uniformly (how many options lie below it), so in
    ascending order the options' spacing does not point at it; a window that would go below zero
    starts at zero instead, so counts under 3 take the first places more often. The spacing is 1 at
    every count: a spacing that grew with the count would tell which of a window's values can be
    the answer (a count whose spacing differs from the window's cannot be).
    """
    start = max(0, count - int(rng.integers(4)))
    return (str(count), *(str(v) for v in range(start, start + 4) if v != count))


def _other_options(correct: str, pool: tuple[str, ...], rng: np.random.Generator) -> tuple[str, ...]:
    others = [name for name in pool if name != correct]
    return (correct, *(str(name) for name in rng.choice(others, size=min(3, len(others)), replace=False)))


def _smallest(objects: list[SceneObject]) -> float | None:
    return min((obj.size_px for obj in objects), default=None)


def _overall_counting(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    cls = OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
    members = [obj for obj in index.objects if obj.cls is cls]
    question = f"How many {_plural(cls)} are there in the image?"
    return [_Item(Category.OVERALL_COUNTING, question, _count_options(len(members), rng), None, _smallest(members))]


def _regional_counting(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    if not index.objects:
        return []
    anchor = index.objects[int(rng.integers(len(index.objects)))]
    # Mostly the anchor's class; sometimes another, so that zero is a possible answer.
    cls = anchor.cls if rng.uniform() < 0.8 else OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
    reach = min(400.0, min(index.truth.width, index.truth.height) / 3)
    box = index.region_around(anchor.bbox, rng, reach)
    members = [index.objects[i] for i in np.flatnonzero(index.inside(box) & (index.classes == OBJECT_CLASSES.index(cls)))]
    question = f"How many {_plural(cls)} are there in the region {_box_text(box)}?"
    return [_Item(Category.REGIONAL_COUNTING, question, _count_options(len(members), rng), box, _smallest(members))]


def _object_colour(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    if not index.objects or index.truth.bands < 3:
        # One band holds no colour: the question would not be answerable from the pixels.
        return []
    i = int(rng.integers(len(index.objects)))
    obj = index.objects[i]
    box = index.alone(i, rng)
    question = f"What is the color of the {obj.cls.value} in the region {_box_text(box)}?"
    # The evidence is the object, not the region around it.
    return [_Item(Category.OBJECT_COLOUR, question, _other_options(obj.colour, COLOURS, rng), obj.bbox, obj.size_px, COLOURS)]


def _object_class(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    if not index.objects:
        return []
    i = int(rng.integers(len(index.objects)))
    obj = index.objects[i]
    box = index.alone(i, rng)
    names = tuple(cls.value for cls in OBJECT_CLASSES)
    question = f"What is the category of the object in the region {_box_text(box)}?"
    return [_Item(Category.OBJECT_CLASS, question, _other_options(obj.cls.value, names, rng), obj.bbox, obj.size_px, names)]


def _regional_land_use(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    truth = index.truth
    longest = min(1024, truth.width // 2, truth.height // 2)
    for _ in range(TRIES):
        width, height = (int(side) for side in rng.uniform(min(128, longest), longest + 1, size=2))
        x0 = int(rng.integers(0, truth.width - width + 1))
        y0 = int(rng.integers(0, truth.height - height + 1))
        labels = truth.landcover.labels(x0, y0, width, height)
        shares = np.bincount(labels.ravel(), minlength=len(LAND_COVERS)) / labels.size
        # Only clear-cut regions: three quarters or more of one class.
        if shares.max() >= 0.75:
            cover = LAND_COVERS[int(shares.argmax())].value
            box = (x0, y0, x0 + width, y0 + height)
            question = f"What is the land use type of the region {_box_text(box)}?"
            names = tuple(c.value for c in LAND_COVERS)
            return [_Item(Category.REGIONAL_LAND_USE, question, _other_options(cover, names, rng), box, None, names)]
    return []


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where `a` is relative to `b`, when the boxes are apart on a clearly dominant axis."""
    dx = (a.bbox[0] + a.bbox[2] - b.bbox[0] - b.bbox[2]) / 2
    dy = (a.bbox[1] + a.bbox[3] - b.bbox[1] - b.bbox[3]) / 2
    if abs(dx) >= 2 * abs(dy):
        if a.bbox[2] <= b.bbox[0]:
            return "left"
        if a.bbox[0] >= b.bbox[2]:
            return "right"
    elif abs(dy) >= 2 * abs(dx):
        if a.bbox[3] <= b.bbox[1]:
            return "above"
        if a.bbox[1] >= b.bbox[3]:
            return "below"
    return None


def _spatial_relation(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    if len(index.objects) < 2:
        return []
    reach = min(1200.0, max(index.truth.width, index.truth.height) / 2)
    centres = (index.boxes[:, :2] + index.boxes[:, 2:]) / 2
    for _ in range(TRIES):
        i = int(rng.integers(len(index.objects)))
        near = np.flatnonzero(np.abs(centres - centres[i]).max(axis=1) <= reach)
        j = int(rng.choice(near))
        relation = _relation(index.objects[i], index.objects[j]) if i != j else None
        if relation is None:
            continue
        a, b = index.objects[i], index.objects[j]
        colour = index.truth.bands >= 3
        question = (
            f"Where is the {_describe(a, colour)} in the region {_box_text(a.bbox)} relative to the "
            f"{_describe(b, colour)} in the region {_box_text(b.bbox)}?"
        )
        union = (min(a.bbox[0], b.bbox[0]), min(a.bbox[1], b.bbox[1]), max(a.bbox[2], b.bbox[2]), max(a.bbox[3], b.bbox[3]))
        options = (relation, *(d for d in DIRECTIONS if d != relation))
        return [_Item(Category.SPATIAL_RELATION, question, options, union, min(a.size_px, b.size_px), DIRECTIONS)]
    return []


def _presence(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    """A pair about one class the scene has: a region holding one of its objects, and one holding none.

    Asked in pairs so that "yes" and "no" are equally frequent for every class (drawing each
    answer apart let the class word tell it: a class absent from the scene is always "no"). The
    "no" region has no object of its own, so it takes its partner's object size: a pair is small or
    large together, and `small` does not tell the answer either.
    """
    truth = index.truth
    present = sorted(set(index.classes.tolist()))
    if not present:
        return []
    code = present[int(rng.integers(len(present)))]
    cls = OBJECT_CLASSES[code]
    anchor = index.objects[int(rng.choice(np.flatnonzero(index.classes == code)))]
    box = index.region_around(anchor.bbox, rng, min(300.0, min(truth.width, truth.height) / 4))
    members = [index.objects[i] for i in np.flatnonzero(index.inside(box) & (index.classes == code))]
    yes = _Item(Category.PRESENCE, f"Is there a {cls.value} in the region {_box_text(box)}?", ("yes", "no"), box, _smallest(members), YES_NO)
    longest = min(768, truth.width // 2, truth.height // 2)
    others = np.flatnonzero(index.classes != code)
    for _ in range(TRIES):
        # Half of the "no" regions sit on an object of another class, so they are not empty land.
        if others.size and rng.uniform() < 0.5:
            box = index.region_around(index.objects[int(rng.choice(others))].bbox, rng, longest / 2)
        else:
            width, height = (int(side) for side in rng.uniform(min(64, longest), longest + 1, size=2))
            x0 = int(rng.integers(0, truth.width - width + 1))
            y0 = int(rng.integers(0, truth.height - height + 1))
            box = index.settle((x0, y0, x0 + width, y0 + height))
        if not (index.inside(box) & (index.classes == code)).any():
            no = _Item(Category.PRESENCE, f"Is there a {cls.value} in the region {_box_text(box)}?", ("no", "yes"), box, yes.object_size_px, YES_NO)
            return _in_random_order([yes, no], rng)
    return []


def _scene_colour(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    """The colour of a class that has one object in the scene, or whose objects share one colour."""
    if index.truth.bands < 3:
        return []
    classes = [cls for cls in OBJECT_CLASSES if len({obj.colour for obj in index.objects if obj.cls is cls}) == 1]
    if not classes:
        return []
    cls = classes[int(rng.integers(len(classes)))]
    members = [obj for obj in index.objects if obj.cls is cls]
    subject = f"the {cls.value}" if len(members) == 1 else f"the {_plural(cls)}"
    question = f"What is the color of {subject} in the image?"
    options = _other_options(members[0].colour, COLOURS, rng)
    return [_Item(Category.OBJECT_COLOUR, question, options, _union(members), _smallest(members), COLOURS)]


def _scene_class(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    """The class of the one object of its colour."""
    if index.truth.bands < 3:
        return []
    colours = [obj.colour for obj in index.objects]
    alone = [obj for obj in index.objects if colours.count(obj.colour) == 1]
    if not alone:
        return []
    obj = alone[int(rng.integers(len(alone)))]
    names = tuple(cls.value for cls in OBJECT_CLASSES)
    question = f"What is the category of the {obj.colour} object in the image?"
    return [_Item(Category.OBJECT_CLASS, question, _other_options(obj.cls.value, names, rng), obj.bbox, obj.size_px, names)]


def _indefinite(word: str) -> str:
    """`word` with its indefinite article ("a red", "an orange")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _scene_presence(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    """A pair about one class the scene has: "Is there a <colour> <class>" with a colour its objects
    have ("yes") and with one they lack ("no").

    Neither word tells the answer, only the pixels do: the class is asked as often with either
    answer (pairs: drawing each answer apart, and dropping repeated texts, left classes that come
    in few colours mostly "no"), and colours are drawn alike for both (drawing absent pairs from
    every unseen colour and class let a model answer from which pairs a question names).
    """
    if index.truth.bands < 3:
        return []
    classes = sorted({obj.cls for obj in index.objects}, key=OBJECT_CLASSES.index)
    if not classes:
        return []
    cls = classes[int(rng.integers(len(classes)))]
    of_class = [obj for obj in index.objects if obj.cls is cls]
    present = sorted({obj.colour for obj in of_class}, key=COLOURS.index)
    absent = [colour for colour in COLOURS if colour not in present]
    if not absent:
        return []
    colour = present[int(rng.integers(len(present)))]
    members = [obj for obj in of_class if obj.colour == colour]
    # Both answers are about the class's objects (a "yes" is told from a "no" by their colours), so
    # both take its smallest object's size: a pair is small or large together.
    size = _smallest(of_class)
    yes = _Item(Category.PRESENCE, f"Is there {_indefinite(colour)} {cls.value} in the image?", ("yes", "no"), _union(members), size, YES_NO)
    # Every object of the class must be looked at to say no.
    colour = absent[int(rng.integers(len(absent)))]
    no = _Item(Category.PRESENCE, f"Is there {_indefinite(colour)} {cls.value} in the image?", ("no", "yes"), _union(of_class), size, YES_NO)
    return _in_random_order([yes, no], rng)


def _in_random_order(items: list[_Item], rng: np.random.Generator) -> list[_Item]:
    return [items[k] for k in rng.permutation(len(items))]


_LABEL_BLOCK = 2048
"""Side of the blocks a whole scene's land-cover labels are counted in."""


def _scene_land_use(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    """The land cover that clearly covers most of the scene."""
    truth = index.truth
    counts = np.zeros(len(LAND_COVERS), dtype=np.int64)
    for y in range(0, truth.height, _LABEL_BLOCK):  # block by block: bounded memory on a UHR scene
        for x in range(0, truth.width, _LABEL_BLOCK):
            width, height = min(_LABEL_BLOCK, truth.width - x), min(_LABEL_BLOCK, truth.height - y)
            counts += np.bincount(truth.landcover.labels(x, y, width, height).ravel(), minlength=len(LAND_COVERS))
    shares = np.sort(counts / counts.sum())
    if shares[-1] - shares[-2] < DOMINANT_MARGIN:
        return []
    cover = LAND_COVERS[int(counts.argmax())].value
    names = tuple(c.value for c in LAND_COVERS)
    question = "What is the dominant land use type in the image?"
    return [_Item(Category.REGIONAL_LAND_USE, question, _other_options(cover, names, rng), None, None, names)]


def _scene_relation(index: SceneIndex, rng: np.random.Generator) -> list[_Item]:
    """Where one object is relative to another, each the only one of its colour and class."""
    if index.truth.bands < 3:
        return []
    kinds = [(obj.colour, obj.cls) for obj in index.objects]
    unique = [obj for obj, kind in zip(index.objects, kinds) if kinds.count(kind) == 1]
    for _ in range(TRIES):
        if len(unique) < 2:
            return []
        i, j = rng.choice(len(unique), size=2, replace=False)
        a, b = unique[int(i)], unique[int(j)]
        relation = _relation(a, b)
        if relation is None:
            continue
        question = f"Where is the {_describe(a, True)} relative to the {_describe(b, True)} in the image?"
        options = (relation, *(d for d in DIRECTIONS if d != relation))
        return [_Item(Category.SPATIAL_RELATION, question, options, _union([a, b]), min(a.size_px, b.size_px), DIRECTIONS)]
    return []


def _union(objects: list[SceneObject]) -> tuple[int, int, int, int]:
    boxes = np.asarray([obj.bbox for obj in objects])
    return int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())


_GENERATORS: dict[Category, Callable[[SceneIndex, np.random.Generator], list[_Item]]] = {
    Category.OVERALL_COUNTING: _overall_counting,
    Category.REGIONAL_COUNTING: _regional_counting,
    Category.OBJECT_COLOUR: _object_colour,
    Category.OBJECT_CLASS: _object_class,
    Category.REGIONAL_LAND_USE: _regional_land_use,
    Category.SPATIAL_RELATION: _spatial_relation,
    Category.PRESENCE: _presence,
}
_SCENE_GENERATORS: dict[Category, Callable[[SceneIndex, np.random.Generator], list[_Item]]] = {
    Category.OVERALL_COUNTING: _overall_counting,
    Category.OBJECT_COLOUR: _scene_colour,
    Category.OBJECT_CLASS: _scene_class,
    Category.REGIONAL_LAND_USE: _scene_land_use,
    Category.SPATIAL_RELATION: _scene_relation,
    Category.PRESENCE: _scene_presence,
}


def generate_questions(
    truth: SceneTruth,
    scene: str,
    count: int,
    *,
    open_fraction: float = 0.25,
    id_prefix: str | None = None,
    referents: Referents | str = Referents.REGION,
    option_order: OptionOrder | str = OptionOrder.SHUFFLED,
) -> list[Question]:
    """`count` distinct questions about one scene, deterministic from its truth.

    `scene` is the scene's path as the questions table records it (relative to the archive root).
    `referents` says how objects are named (module docstring), `option_order` how multiple-choice
    options are laid out. Categories are drawn by
    CATEGORY_WEIGHTS (SCENE_CATEGORY_WEIGHTS for scene referents); one that cannot be asked of this
    scene (no objects, no colour in a one-band scene) gives way to another. A share `open_fraction` of the questions
    is open, the rest multiple choice with options shuffled. Presence questions come in pairs
    asked whole or not at all, so fewer than `count` come back when the scene cannot support more
    distinct questions or only a pair would fill the last place.
    """
    if count < 0:
        raise ValueError(f"question count must be >= 0, got {count}")
    if not 0.0 <= open_fraction <= 1.0:
        raise ValueError(f"open_fraction must be in [0, 1], got {open_fraction}")
    referents, option_order = Referents(referents), OptionOrder(option_order)
    generators, table = (
        (_GENERATORS, CATEGORY_WEIGHTS) if referents is Referents.REGION else (_SCENE_GENERATORS, SCENE_CATEGORY_WEIGHTS)
    )
    prefix = id_prefix if id_prefix is not None else scene.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    rng = np.random.default_rng(np.random.SeedSequence([truth.seed, _QUESTION_STREAM]))
    index = SceneIndex(truth)
    categories = list(table)
    weights = np.asarray([table[c] for c in categories])
    questions: list[Question] = []
    asked: set[str] = set()
    for _ in range(count * TRIES):
        if len(questions) == count:
            break
        category = categories[int(rng.choice(len(categories), p=weights / weights.sum()))]
        items = generators[category](index, rng)
        texts = {item.question for item in items}
        # A pair is asked whole or not at all, so its answers stay balanced.
        if not items or texts & asked or len(texts) < len(items) or len(questions) + len(items) > count:
            continue
        asked |= texts
        # A pair shares its form too, so the multiple-choice rows stay balanced.
        form = Form.OPEN if rng.uniform() < open_fraction else Form.MC
        for item in items:
            questions.append(_finish(item, form, option_order, f"{prefix}_q{len(questions):03d}", scene, truth.seed, rng))
    return questions


def _fixed_options(item: _Item, rng: np.random.Generator) -> list[str]:
    """`OptionOrder.FIXED`: the category's labels in order (a random few left out past five), or ascending counts."""
    correct = item.options[0]
    if not item.labels:
        return sorted(item.options, key=int)
    others = [label for label in item.labels if label != correct]
    kept = {correct, *(str(label) for label in rng.choice(others, size=min(len(others), len(LETTERS) - 1), replace=False))}
    return [label for label in item.labels if label in kept]


def _finish(
    item: _Item, form: Form, order: OptionOrder, question_id: str, scene: str, seed: int, rng: np.random.Generator
) -> Question:
    correct = item.options[0]
    if form is Form.MC:
        if order is OptionOrder.FIXED:
            options = _fixed_options(item, rng)
        else:
            options = [item.options[k] for k in rng.permutation(len(item.options))]
        choices = [f"({LETTERS[k]}) {text}" for k, text in enumerate(options)]
        answer = LETTERS[options.index(correct)]
    else:
        choices, answer = [], correct
    size = item.object_size_px
    return Question(
        question_id=question_id,
        scene=scene,
        question=item.question,
        choices=choices,
        answer=answer,
        answer_text=correct,
        category=item.category.value,
        bbox=None if item.bbox is None else [float(v) for v in item.bbox],
        object_size_px=size,
        small=size is not None and size < SMALL_OBJECT_PX,
        form=form.value,
        seed=seed,
    )
