"""Plan a VQA run: load or make the questions, resolve scene URIs, skip what is done, group by scene.

Everything here runs on the driver before Ray Data starts, so bad inputs stop the job early with a
message naming the input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from uhr.config import ConfigError
from uhr.scenes import list_scenes
from uhr.scenes.listing import DEFAULT_SCENE_PATTERNS
from uhr.storage import StorageConfig, absolute_uri, join_uri, redact, uri_protocol

logger = logging.getLogger(__name__)

QUESTIONS_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("scene", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("choices", pa.list_(pa.string())),
        # In `scene`'s pixels: a multi-image question's evidence lies in its first image.
        pa.field("bbox", pa.list_(pa.float64())),
        pa.field("prompt", pa.string()),
        # A multi-image question's further images, shown after `scene` in this order (XLRS-Bench's
        # bi-temporal pairs); null or empty for a question on one image.
        pa.field("extra_scenes", pa.list_(pa.string())),
        # The table's `answer` column when it has one (a benchmark's or synthetic archive's truth).
        pa.field("reference", pa.string()),
    ]
)
REQUIRED_COLUMNS = ("question_id", "scene", "question")
# Columns CSV cells are read as text (no type inference: id 007 stays "007", not 7).
TEXT_COLUMNS = ("question_id", "scene", "question", "choices", "bbox", "prompt", "answer", "extra_scenes")
SCENE_LIST_SUFFIXES = (".txt", ".lst")


class InputError(ConfigError):
    """A questions or scenes input that cannot be used."""


def _read_table(uri: str, storage: StorageConfig) -> pa.Table:
    fs = storage.filesystem(uri)
    suffix = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
    as_text = pacsv.ConvertOptions(column_types={name: pa.string() for name in TEXT_COLUMNS})
    readers = {
        "parquet": pq.read_table,
        "jsonl": pajson.read_json,
        "json": pajson.read_json,
        "csv": lambda handle: pacsv.read_csv(handle, convert_options=as_text),
    }
    if suffix not in readers:
        raise InputError(f"questions file {redact(uri)}: unknown format {suffix!r}; use .parquet, .jsonl or .csv")
    try:
        with fs.open(uri, "rb") as handle:
            return readers[suffix](handle)
    except FileNotFoundError as err:
        raise InputError(f"questions file {redact(uri)} does not exist") from err
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        raise InputError(f"questions file {redact(uri)} cannot be read as {suffix}: {redact(str(err))}") from err


def _as_list_column(table: pa.Table, name: str, value_type: pa.DataType, uri: str) -> pa.Array:
    """CSV cells hold lists as JSON text ('["(A) 1", "(B) 2"]'); Parquet/JSONL hold real lists."""
    column = table.column(name)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.cast(pa.list_(value_type))
    try:
        return _parse_json_lists(column, value_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass  # the row-by-row parse below names the first bad cell
    values = []
    for row, cell in enumerate(column.to_pylist()):
        if cell is None or cell == "":
            values.append(None)
            continue
        try:
            parsed = json.loads(cell) if isinstance(cell, str) else cell
        except json.JSONDecodeError as err:
            raise InputError(f"questions file {redact(uri)}, row {row}: {name} is not a JSON list: {cell!r}") from err
        if not isinstance(parsed, list):
            raise InputError(f"questions file {redact(uri)}, row {row}: {name} must be a list, got {cell!r}")
        values.append(parsed)
    try:
        return pa.array(values, type=pa.list_(value_type))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise InputError(f"questions file {redact(uri)}: column {name} has values of the wrong type: {err}") from err


def _parse_json_lists(column: pa.ChunkedArray, value_type: pa.DataType) -> pa.Array:
    """A text column of JSON lists (empty or null cells: null) parsed by Arrow's JSON reader, as one
    `{"v": cell}` document per line; raises `pa.ArrowInvalid` on any cell that is not a list of
    `value_type`. About 6x faster than `json.loads` per cell on a million rows."""
    text = column.cast(pa.large_string())
    text = pc.if_else(pc.fill_null(pc.equal(text, ""), True), pa.scalar("null", pa.large_string()), text)
    head, tail = pa.scalar('{"v":', pa.large_string()), pa.scalar("}\n", pa.large_string())
    lines = pc.binary_join_element_wise(head, text, tail, pa.scalar("", pa.large_string())).combine_chunks()
    whole = pa.LargeListArray.from_arrays(pa.array([0, len(lines)], pa.int64()), lines)
    document = pc.binary_join(whole, pa.scalar("", pa.large_string()))[0].as_buffer()
    options = pajson.ParseOptions(explicit_schema=pa.schema([("v", pa.list_(value_type))]), newlines_in_values=True)
    parsed = pajson.read_json(pa.BufferReader(document), parse_options=options)
    if parsed.num_rows != len(column):
        raise pa.ArrowInvalid(f"{parsed.num_rows} JSON documents for {len(column)} cells")
    return parsed.column("v").combine_chunks()


def load_questions(uri: str, storage: StorageConfig) -> pa.Table:
    """Read a questions table (Parquet, JSONL or CSV) into `QUESTIONS_SCHEMA`, validated.

    Raises `InputError` for a missing or unreadable file, missing columns, empty or duplicate
    question ids, empty questions, a bbox that is not four numbers, or an empty extra scene.
    """
    table = _read_table(uri, storage)
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise InputError(
            f"questions file {redact(uri)} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}"
        )
    if table.num_rows == 0:
        raise InputError(f"questions file {redact(uri)} has no rows")
    columns = {name: table.column(name).cast(pa.string()) for name in REQUIRED_COLUMNS}
    for name, value_type in (("choices", pa.string()), ("bbox", pa.float64()), ("extra_scenes", pa.string())):
        if name in table.column_names:
            columns[name] = _as_list_column(table, name, value_type, uri)
        else:
            columns[name] = pa.nulls(table.num_rows, type=pa.list_(value_type))
    # A benchmark's own prompt template, used verbatim instead of the default question layout.
    columns["prompt"] = (
        table.column("prompt").cast(pa.string()) if "prompt" in table.column_names else pa.nulls(table.num_rows, pa.string())
    )
    columns["reference"] = (
        table.column("answer").cast(pa.string()) if "answer" in table.column_names else pa.nulls(table.num_rows, pa.string())
    )
    questions = pa.table(columns, schema=QUESTIONS_SCHEMA.remove_metadata())
    for name in REQUIRED_COLUMNS:
        empty = pc.sum(pc.or_(pc.is_null(questions[name]), pc.equal(questions[name], ""))).as_py() or 0
        if empty:
            raise InputError(f"questions file {redact(uri)}: {empty} row(s) have an empty {name}")
    ids = questions["question_id"]
    if pc.count_distinct(ids).as_py() != questions.num_rows:
        counts = pc.value_counts(ids)
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise InputError(f"questions file {redact(uri)}: duplicate question_id(s) {dup}")
    row = _first_improper_box(questions["bbox"].combine_chunks())
    if row is not None:
        box = questions["bbox"][row].as_py()
        raise InputError(f"questions file {redact(uri)}, row {row}: bbox must be [x0, y0, x1, y1] with x1 > x0, y1 > y0, got {box}")
    extras = questions["extra_scenes"].combine_chunks()
    empty = pc.fill_null(pc.equal(pc.list_flatten(extras), ""), True)
    if pc.any(empty).as_py():
        row = pc.list_parent_indices(extras).filter(empty)[0].as_py()
        raise InputError(f"questions file {redact(uri)}, row {row}: extra_scenes holds an empty scene: {extras[row].as_py()}")
    return questions


def proper_boxes(boxes: np.ndarray) -> np.ndarray:
    """(N,) whether each row of (N, 4) `boxes` is [x0, y0, x1, y1] of finite numbers with x1 > x0 and
    y1 > y0: the only bbox a question may carry."""
    return np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def is_proper_box(box: list[float]) -> bool:
    """One box by `proper_boxes`' rule (a list of four numbers)."""
    return len(box) == 4 and bool(proper_boxes(np.array([box], dtype=np.float64))[0])


def _first_improper_box(boxes: pa.ListArray) -> int | None:
    """Row of the first non-null box that `proper_boxes` refuses (or that is not four numbers), or None."""
    given = boxes.is_valid().to_numpy(zero_copy_only=False)
    four = given & (pc.fill_null(pc.list_value_length(boxes), 0).to_numpy() == 4)
    bad = given & ~four
    # A null inside a box becomes NaN, which is not finite.
    values = pc.list_flatten(boxes.filter(pa.array(four))).to_numpy(zero_copy_only=False).astype(np.float64)
    bad[four] = ~proper_boxes(values.reshape(-1, 4))
    return int(np.argmax(bad)) if bad.any() else None


def question_id(scene: str, text: str) -> str:
    """A stable id for `text` asked of `scene`, so `--ask` runs resume like table runs."""
    return hashlib.sha1(f"{scene}\n{text}".encode()).hexdigest()[:16]


def _unique(items: Iterable[str], what: str) -> list[str]:
    """`items` in order without repeats, with a warning naming those given more than once."""
    seen: dict[str, int] = {}
    for item in items:
        seen[item] = seen.get(item, 0) + 1
    repeated = [item for item, count in seen.items() if count > 1]
    if repeated:
        logger.warning("%d %s given more than once, each asked once: %s", len(repeated), what, redact(", ".join(repeated[:5])))
    return list(seen)


def questions_from_ask(scenes: Iterable[str], asks: list[str]) -> pa.Table:
    """Every question of `asks` asked of every scene, with ids derived from scene and text.

    A scene or a question given twice is asked once (with a warning): one row per question id.
    """
    scenes, asks = _unique(scenes, "scene(s)"), _unique(asks, "question(s)")
    rows = [(question_id(scene, text), scene, text) for scene in scenes for text in asks]
    if not rows:
        raise InputError("no questions: the scene list is empty")
    ids, scene_uris, texts = zip(*rows)
    return pa.table(
        {
            "question_id": list(ids),
            "scene": list(scene_uris),
            "question": list(texts),
            "choices": pa.nulls(len(rows), type=pa.list_(pa.string())),
            "bbox": pa.nulls(len(rows), type=pa.list_(pa.float64())),
            "prompt": pa.nulls(len(rows), type=pa.string()),
            "extra_scenes": pa.nulls(len(rows), type=pa.list_(pa.string())),
            "reference": pa.nulls(len(rows), type=pa.string()),
        },
        schema=QUESTIONS_SCHEMA.remove_metadata(),
    )


def is_scene_list(scenes: str) -> bool:
    """True when `scenes` names a text file listing scenes rather than a prefix."""
    return scenes.lower().endswith(SCENE_LIST_SUFFIXES)


def scenes_root(scenes: str) -> str:
    """What relative scene names resolve against: the prefix itself, or a scene list's folder."""
    if not is_scene_list(scenes):
        return scenes
    if uri_protocol(scenes) is None:
        return os.path.dirname(os.path.abspath(scenes))
    return posixpath.dirname(scenes)


def scene_uris(scenes: str, storage: StorageConfig, patterns: Sequence[str] = DEFAULT_SCENE_PATTERNS) -> list[str]:
    """The scenes named by `scenes`: a prefix (its files matching `patterns`) or a text file with
    one URI per line.

    Relative names in a list resolve against the list file's folder.
    """
    if is_scene_list(scenes):
        fs = storage.filesystem(scenes)
        try:
            with fs.open(scenes, "rt") as handle:
                uris = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        except FileNotFoundError as err:
            raise InputError(f"scene list {redact(scenes)} does not exist") from err
        if not uris:
            raise InputError(f"scene list {redact(scenes)} is empty")
        return [resolve_scene(uri, scenes_root(scenes)) for uri in uris]
    uris = list_scenes(scenes, patterns, storage=storage)
    if not uris:
        raise InputError(f"no scenes matching {', '.join(patterns)} under {redact(scenes)}")
    return uris


def resolve_scene(scene: str, scenes_prefix: str | None) -> str:
    """Absolute URI of a questions-table scene: relative names resolve against `scenes_prefix` (a
    prefix, or a scene list's folder), and a local path with no prefix against the working directory."""
    if uri_protocol(scene) is not None or scene.startswith("/") or scenes_prefix is None:
        return absolute_uri(scene)
    return absolute_uri(join_uri(scenes_root(scenes_prefix), scene))


GROUP_QUESTION_KEYS = ("question_id", "question", "choices", "bbox", "prompt")
"""What each question of a group carries to the stages."""


@dataclass(frozen=True)
class Plan:
    """What a run will do: pending questions grouped by scene, and what was already done."""

    groups: pa.Table
    """One row per scene, or per image sequence of multi-image questions: `scene` (URI),
    `extra_scenes` (list of URIs, empty for one image) and `questions` (list of structs of
    `GROUP_QUESTION_KEYS`); rows by their images, questions by id. Arrow, not Python objects: a
    driver planning millions of questions holds them in a fraction of the memory."""
    total: int
    """Questions in the input."""
    done: int
    """Questions skipped because the output already holds their rows."""
    scene_reads: int
    """Scenes the run reads and encodes: each group's images (one read per group it is in)."""

    @property
    def pending(self) -> int:
        return self.total - self.done


def choice_references(questions: pa.Table) -> dict[str, str]:
    """question_id -> reference letter(s), for the multiple-choice questions that have a reference answer."""
    return {
        qid: reference
        for qid, choices, reference in zip(*(questions[name].to_pylist() for name in ("question_id", "choices", "reference")))
        if choices and reference
    }


def make_plan(questions: pa.Table, scenes_prefix: str | None, done_ids: pa.Array) -> Plan:
    """Group pending questions (those whose id is not in `done_ids`) by their resolved images (a
    scene, or a multi-image question's sequence), groups and questions in a stable order.

    Each group is read and encoded once for all its questions; an image that is also asked about
    alone or in another sequence is encoded once per group it is in. Column-wise in Arrow: each
    distinct scene name is resolved once, and no question becomes a Python object.
    """
    pending = questions.filter(pc.invert(pc.is_in(questions["question_id"], done_ids.cast(pa.string()))))
    resolve = cache(partial(resolve_scene, scenes_prefix=scenes_prefix))
    scenes = _resolved(pending["scene"].combine_chunks(), resolve)
    extras = pc.fill_null(pending["extra_scenes"].combine_chunks(), pa.scalar([], pa.list_(pa.string())))
    extras = pa.ListArray.from_arrays(extras.offsets, _resolved(pc.list_flatten(extras), resolve))
    # A group is its image sequence; "\x00" joins it into a key that sorts as the sequence does.
    keyed = pa.table({
        "scene": scenes, "extra_scenes": extras, "sequence": pc.binary_join(extras, "\x00"),
        **{key: pending[key].combine_chunks() for key in GROUP_QUESTION_KEYS},
    })  # fmt: skip
    keyed = keyed.take(pc.sort_indices(keyed, [(key, "ascending") for key in ("scene", "sequence", "question_id")]))
    starts = _run_starts(keyed["scene"], keyed["sequence"])
    offsets = pa.array([*starts.to_pylist(), keyed.num_rows], pa.int32())
    questions_of = pa.StructArray.from_arrays([keyed[key].combine_chunks() for key in GROUP_QUESTION_KEYS], GROUP_QUESTION_KEYS)
    groups = pa.table({
        "scene": keyed["scene"].take(starts), "extra_scenes": keyed["extra_scenes"].take(starts),
        "questions": pa.ListArray.from_arrays(offsets, questions_of),
    })  # fmt: skip
    scene_reads = groups.num_rows + (pc.sum(pc.list_value_length(groups["extra_scenes"])).as_py() or 0)
    return Plan(groups=groups, total=questions.num_rows, done=questions.num_rows - pending.num_rows, scene_reads=scene_reads)


def _resolved(names: pa.Array, resolve: Callable[[str], str]) -> pa.Array:
    """`resolve` applied to each distinct name of `names` once, the result laid out like `names`."""
    encoded = pc.dictionary_encode(names)
    return pa.array([resolve(name) for name in encoded.dictionary.to_pylist()], pa.string()).take(encoded.indices)


def _run_starts(*columns: pa.ChunkedArray) -> pa.Array:
    """Rows of sorted `columns` whose values differ from the row before's: where each run starts."""
    rows = len(columns[0])
    if rows == 0:
        return pa.array([], pa.int64())
    changed = np.zeros(rows, dtype=bool)
    changed[0] = True
    for column in columns:
        values = column.combine_chunks()
        changed[1:] |= pc.not_equal(values.slice(1), values.slice(0, rows - 1)).to_numpy(zero_copy_only=False)
    return pa.array(np.flatnonzero(changed))
