"""A whole synthetic archive: scenes, their questions, their truth and, for training, conversations.

Layout under the archive root (a local directory or an s3:// prefix):

    scenes/scene_0000.tif ...   COGs (see `uhr.synth.scene`)
    questions.parquet           one row per question (schema: QUESTIONS_SCHEMA)
    questions.jsonl             the same rows as JSON lines
    truth.json                  {"split", "seed", ..., "scenes": {"scenes/scene_0000.tif": truth}}
    train.jsonl                 split "train" only: LLaVA conversations, one per question, and with
                                `evidence_window` one more per question with evidence, on a window
                                around it (`uhr.train.data` reads a record's `window`); with
                                `object_captions` one per object, listing what a window around it shows;
                                with `small_on_whole_scene` False, none on the whole scene for a
                                question about small objects

Scene seeds come from (archive seed, split, scene index), so a train and a test archive made with
the same seed share no scene.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uhr.cache import creating
from uhr.storage import StorageConfig, is_remote, join_uri
from uhr.synth.questions import OptionOrder, Question, Referents, SceneIndex, generate_questions
from uhr.synth.scene import Compression, SceneTruth, write_scene

logger = logging.getLogger(__name__)

SPLITS = ("test", "train")
# Bump when a change to `uhr.synth` changes what the same settings write: cached archives are then
# written again (`cached_archive`). 2: presence questions whose words do not tell the answer.
# 3: evidence-window records follow their question's record. 4: training records carry `bbox`.
# 5: count options with the answer at a uniformly drawn place; presence questions in yes/no pairs.
# 6: count options consecutive; a presence pair shares its object size and form.
# 7: a region's colour or class question has the object as its evidence bbox; an evidence-window
# record holds the regions its question names, their boxes rewritten in its frame.
GENERATOR_VERSION = 7
# The prompt of an object-caption conversation (`caption_conversation`).
CAPTION_PROMPT = "List the objects in the image."
QUESTIONS_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("scene", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("choices", pa.list_(pa.string()), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("answer_text", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("bbox", pa.list_(pa.float64())),
        pa.field("object_size_px", pa.float64()),
        pa.field("small", pa.bool_(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
    ]
)


@dataclass
class ArchiveIndex:
    """What `write_archive` wrote: URIs of every file and the counts."""

    root: str
    split: str
    scenes: list[str]
    questions_parquet: str
    questions_jsonl: str
    truth_json: str
    train_jsonl: str | None
    n_scenes: int
    n_questions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scene_seed(seed: int, split: str, index: int) -> int:
    """The seed of scene `index` of an archive: distinct per (archive seed, split, index)."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1)[0])


def scene_path(index: int) -> str:
    """A scene's path relative to the archive root."""
    return f"scenes/scene_{index:04d}.tif"


def conversation(question: Question) -> dict[str, Any]:
    """A question as one LLaVA training conversation (GeoLLaVA-Data / SuperRS-VQA shape).

    A question with evidence also carries its scene-pixel `bbox` (x0, y0, x1, y1), which the
    fine-tuning job's grounding loss (`uhr.train.grounding`) points the LM's attention at.
    """
    record: dict[str, Any] = {
        "id": question.question_id,
        "image": question.scene,
        "conversations": [
            {"from": "human", "value": "<image>\n" + question.prompt()},
            {"from": "gpt", "value": question.answer},
        ],
    }
    if question.bbox is not None:
        record["bbox"] = list(question.bbox)
    return record


def caption_conversation(index: SceneIndex, scene: str, number: int, min_side: int) -> dict[str, Any]:
    """Object `number` of a scene (`index`) as a caption conversation on a window around it.

    The window is `window_around` the object's box (at least `min_side`); the answer names every
    object lying wholly inside it, top to bottom then left to right, as "colour class" (the class
    alone in a scene of fewer than three bands, whose pixels hold no colour). Like LLaVA's
    alignment captions, every answer word is something the pixels show, so the tower and projector
    learn colour and shape from a dense signal rather than from a yes or a letter.
    """
    truth = index.truth
    obj = truth.objects[number]
    col, row, side, _ = window_around(list(obj.bbox), min(truth.width, truth.height), min_side)
    inside = [truth.objects[k] for k in np.flatnonzero(index.inside((col, row, col + side, row + side)))]
    inside.sort(key=lambda other: (other.centre[1], other.centre[0]))
    colour = truth.bands >= 3
    caption = ", ".join(f"{other.colour} {other.cls.value}" if colour else other.cls.value for other in inside)
    return {
        "id": f"{Path(scene).stem}_obj{obj.id:03d}@caption",
        "image": scene,
        "window": [col, row, side, side],
        "conversations": [
            {"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
            {"from": "gpt", "value": caption},
        ],
    }


def window_around(bbox: list[float], size: int, min_side: int) -> list[int]:
    """A square window [col_off, row_off, side, side] inside a `size`-px scene around `bbox` (x0, y0, x1, y1).

    The side is a quarter larger than the box's longest side, at least `min_side` (at most the
    scene); the window is centred on the box and shifted inward where it would leave the scene.
    """
    x0, y0, x1, y1 = bbox
    side = min(size, max(min_side, math.ceil(1.25 * max(x1 - x0, y1 - y0))))

    def offset(low: float, high: float) -> int:
        return int(min(max(0, round((low + high - side) / 2)), size - side))

    return [offset(x0, x1), offset(y0, y1), side, side]


def write_archive(
    out_uri: str,
    *,
    scenes: int,
    size: int,
    seed: int,
    split: str = "test",
    dtype: str = "uint8",
    bands: int = 3,
    storage: StorageConfig | None = None,
    questions_per_scene: int = 12,
    open_fraction: float = 0.25,
    referents: Referents | str = Referents.REGION,
    option_order: OptionOrder | str = OptionOrder.SHUFFLED,
    compress: Compression | str = Compression.DEFLATE,
    evidence_window: int | None = None,
    object_captions: int | None = None,
    small_on_whole_scene: bool = True,
) -> ArchiveIndex:
    """Write a synthetic archive of `scenes` square scenes of `size` px under `out_uri`.

    Deterministic from its arguments. `split` "train" also writes `train.jsonl`; its scenes never
    coincide with the "test" scenes of the same seed. `referents` and `option_order` shape the
    questions (`uhr.synth.questions`). With `evidence_window` (pixels; "train" only), every question
    with evidence is also a training conversation on a window of at least that side around it, at
    full resolution where the window fits the model's view: the model sees what it is asked about
    even where a whole-scene view is too coarse to show it. With `object_captions` (pixels; "train"
    only), every object is also a caption conversation on a window of at least that side around it
    (`caption_conversation`), after its scene's questions. With `small_on_whole_scene` False
    ("train" only), a question about small objects (`Question.small`) gets no whole-scene
    conversation, only its evidence window's where it has one (an overall count has none): a
    downsampled whole-scene view does not show it, and asking it there teaches the model to
    answer from the question's words. Scenes are written one at a time (each in bounded memory);
    the tables are written once all scenes are done.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if scenes < 1:
        raise ValueError(f"an archive needs at least one scene, got scenes={scenes}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if questions_per_scene < 1:
        raise ValueError(f"questions_per_scene must be >= 1, got {questions_per_scene}")
    for name, side in (("evidence_window", evidence_window), ("object_captions", object_captions)):
        if side is not None and (split != "train" or side < 1):
            raise ValueError(f"{name} needs split 'train' and a side >= 1, got {side} for {split!r}")
    if not small_on_whole_scene and split != "train":
        raise ValueError(f"small_on_whole_scene=False needs split 'train', got {split!r}")
    storage = storage or StorageConfig()
    questions: list[Question] = []
    records: list[dict[str, Any]] = []
    truths: dict[str, Any] = {}
    scene_uris: list[str] = []
    for index in range(scenes):
        relative = scene_path(index)
        uri = join_uri(out_uri, *relative.split("/"))
        started = time.perf_counter()
        truth = write_scene(
            uri, size, scene_seed(seed, split, index), dtype=dtype, bands=bands, storage=storage, compress=compress
        )
        asked = generate_questions(
            truth, relative, questions_per_scene, open_fraction=open_fraction, referents=referents, option_order=option_order
        )
        questions.extend(asked)
        if split == "train":
            records.extend(
                _training_records(asked, truth, relative, size, evidence_window, object_captions, small_on_whole_scene)
            )
        truths[relative] = truth.to_dict()
        scene_uris.append(uri)
        logger.info(
            "wrote %s (%d objects, %d questions) in %.1f s",
            uri, len(truth.objects), len(asked), time.perf_counter() - started,
        )
    rows = [question.to_row() for question in questions]
    truth_doc = {
        "split": split,
        "seed": seed,
        "size": size,
        "dtype": dtype,
        "bands": bands,
        "compress": Compression(compress).value,
        "scenes": truths,
    }
    files: dict[str, Any] = {
        "questions.parquet": pa.Table.from_pylist(rows, schema=QUESTIONS_SCHEMA),
        "questions.jsonl": _jsonl(rows),
        "truth.json": json.dumps(truth_doc),
    }
    if split == "train":
        files["train.jsonl"] = _jsonl(records)
    _put_files(out_uri, files, storage)
    return ArchiveIndex(
        root=out_uri,
        split=split,
        scenes=scene_uris,
        questions_parquet=join_uri(out_uri, "questions.parquet"),
        questions_jsonl=join_uri(out_uri, "questions.jsonl"),
        truth_json=join_uri(out_uri, "truth.json"),
        train_jsonl=join_uri(out_uri, "train.jsonl") if split == "train" else None,
        n_scenes=scenes,
        n_questions=len(questions),
    )


_REGION_TEXT = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")
"""A region named in a question's text (`uhr.synth.questions` writes it as [x0, y0, x1, y1])."""


def _window_record(question: Question, size: int, min_side: int) -> dict[str, Any]:
    """`question` as a conversation on a window around its evidence and the regions it names.

    The window holds named regions whole, so the answer about them stands; their boxes are
    rewritten in the window's frame, the one the model sees the window in as a scene of its own.
    """
    boxes = [question.bbox, *([float(v) for v in named.groups()] for named in _REGION_TEXT.finditer(question.question))]
    around = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    col, row, side, _ = window_around(around, size, min_side)

    def shifted(match: re.Match[str]) -> str:
        x0, y0, x1, y1 = (int(value) for value in match.groups())
        return f"[{x0 - col}, {y0 - row}, {x1 - col}, {y1 - row}]"

    asked = replace(question, question=_REGION_TEXT.sub(shifted, question.question))
    return {**conversation(asked), "id": f"{question.question_id}@window", "window": [col, row, side, side]}


def _training_records(
    questions: list[Question],
    truth: SceneTruth,
    scene: str,
    size: int,
    evidence_window: int | None,
    object_captions: int | None,
    small_on_whole_scene: bool,
) -> list[dict[str, Any]]:
    """One scene's training conversations, in the order `write_archive` documents."""
    records = []
    for question in questions:
        if small_on_whole_scene or not question.small:
            records.append(conversation(question))
        # Right after the whole-scene record: a training loader's local shuffle then mixes both kinds.
        if evidence_window is not None and question.bbox is not None:
            records.append(_window_record(question, size, evidence_window))
    if object_captions is not None:
        index = SceneIndex(truth)
        records.extend(caption_conversation(index, scene, number, object_captions) for number in range(len(truth.objects)))
    return records


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _put_files(root: str, files: dict[str, Any], storage: StorageConfig) -> None:
    """Write named files (text or a pyarrow Table) under `root`: staged, then uploaded or renamed in."""
    local_root = None if is_remote(root) else os.path.abspath(root.split("://", 1)[-1])
    if local_root is not None:
        os.makedirs(local_root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local_root, prefix=".uhr-synth-") as staging:
        for name, content in files.items():
            local = os.path.join(staging, name)
            if isinstance(content, pa.Table):
                pq.write_table(content, local)
            else:
                with open(local, "w", encoding="utf-8") as handle:
                    handle.write(content)
            if local_root is None:
                target = join_uri(root, name)
                storage.filesystem(target).put_file(local, target)
            else:
                os.replace(local, os.path.join(local_root, name))


def cached_archive(root: Path, **settings: Any) -> ArchiveIndex:
    """`write_archive(root, **settings)`, done once: later calls read the `index.json` it leaves,
    and a call made while another process writes the archive waits for it (`uhr.cache.creating`).

    The index records the settings and `GENERATOR_VERSION`; an archive written with others (or by
    a version that recorded neither) is deleted and written again, so a cache never serves
    questions an older generator made.
    """
    index = root / "index.json"
    stamp = {"generator": GENERATOR_VERSION, "settings": json.loads(json.dumps(settings))}
    with creating(root):
        recorded = json.loads(index.read_text()) if index.exists() else None
        if recorded is not None and {key: recorded.get(key) for key in stamp} != stamp:
            logger.info("rewriting the synthetic archive at %s: written by other settings or generator version", root)
            shutil.rmtree(root)
            recorded = None
        if recorded is None:
            logger.info("writing a synthetic archive to %s: %s", root, settings)
            archive = write_archive(str(root), **settings)
            recorded = {**stamp, "archive": archive.to_dict()}
            index.write_text(json.dumps(recorded))
    return ArchiveIndex(**recorded["archive"])
