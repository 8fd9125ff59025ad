"""Benchmarks in their published layouts -> one item table, prompts built with each one's own template.

Every loader returns a pyarrow table with `ITEM_SCHEMA`, one row per question:

    question_id     string        the benchmark's own id (XLRS `index`, LRS-VQA `question_id`, ...)
    source          string        the benchmark (`Benchmark` value)
    images          list<string>  image URIs, in the order the model sees them (several: see XLRS)
    question        string        the question as published, without options or instructions
    choices         list<string>  lettered options "(A) ..." as published; [] for open questions
    answer          string        the truth as published: option letter(s), or the open answer
    form            string        "mc" (multiple choice) or "open"
    category        string        what the benchmark reports accuracy by (XLRS "Task/Subtask", ...)
    subset          string|null   LRS-VQA source dataset (FAIR, STAR, GLH-Bridge); null elsewhere
    prompt          string        the user-turn text after the image, built as the benchmark's code does
    bbox            list<double>  region [x1, y1, x2, y2] in image pixels when published, else null
    object_size_px  double|null   size of the object the answer depends on (synthetic only)
    small           bool|null     object < 32 px (synthetic only)
    meta            string        JSON object of the remaining published fields, verbatim

The image placeholder is not part of `prompt`: all three benchmarks put the image first
("<image>\\n" + prompt in LLaVA conversations), and where it goes is the chat template's business.

Layouts (facts from the benchmarks' public code):

* XLRS-Bench lite (`initiacms/XLRS-Bench-lite`, run by lmms-eval task `xlrs-lite`): Hugging Face
  `datasets` data files — Arrow streams (`save_to_disk`: `train/data-*.arrow`) or Parquet — with
  `index`, `image` (a list of {bytes, path} images), `question`, `multi-choice options`,
  `answer`, `category`, `l2-category`. Images are embedded, so the loader writes each one out once
  (to `image_dir`) and the table holds their URIs. Multi-image items (the bi-temporal change-
  detection sub-task) are asked of every image, in order, as lmms-eval's `xlrs_doc_to_visual`
  hands them all to the model (one image placeholder each); the report counts these items
  (`n_images` in `meta`).
* LRS-VQA (`LRS_VQA/LRS_VQA_merged.jsonl`): `question_id` (`FAIR_n`, `STAR_n`, `GLH-Bridge_n`),
  `image` (relative to the folder ABOVE `LRS_VQA/`, e.g. "LRS_VQA/image/15565.tif"), `category`,
  `text` (already ends with the answer instruction), `ground_truth`, and `hbox`, `rbox`,
  `abs_size`, `size_bin`, `image_size`.
* MME-RealWorld (`MME_RealWorld.json`, or LRS-VQA's `MME_RealWorld_RS.json`): a JSON list with
  `Question_id`, `Image` (relative to the JSON's folder), `Text`, `Answer choices`, `Ground truth`,
  `Task`, `Subtask`, `Category`; the remote-sensing split is `Subtask == "Remote Sensing"`.
* synthetic (`uhr.synth`): `<archive>/questions.parquet` with scenes relative to the archive;
  prompts are `uhr.synth`'s own (those of its training conversations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from uhr.cache import default_cache_dir
from uhr.storage import StorageConfig, join_uri, redact, uri_protocol
from uhr.synth.questions import question_prompt
from uhr.prompts import (
    MmePromptStyle,
    lrs_vqa_prompt,
    mme_realworld_prompt,
    xlrs_prompt,
)

logger = logging.getLogger(__name__)


class Benchmark(str, Enum):
    """The benchmarks uhr loads and scores."""

    XLRS_LITE = "xlrs-lite"
    LRS_VQA = "lrs-vqa"
    MME_REALWORLD_RS = "mme-realworld-rs"
    SYNTHETIC = "synthetic"


ITEM_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("choices", pa.list_(pa.string()), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("subset", pa.string()),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("bbox", pa.list_(pa.float64())),
        pa.field("object_size_px", pa.float64()),
        pa.field("small", pa.bool_()),
        pa.field("meta", pa.string(), nullable=False),
    ]
)

# ---------------------------------------------------------------------------------------------
# Prompts: exact strings of each benchmark's evaluation code.

XLRS_SUBTASKS: tuple[str, ...] = (
    "Complex reasoning/Anomaly Detection and Interpretation",
    "Complex reasoning/Environmental condition reasoning",
    "Complex reasoning/Route planning",
    "Counting/Counting with changing detection",
    "Counting/Counting with complex reasoning",
    "Counting/Overall counting",
    "Counting/Regional counting",
    "Land use classification/Overall Land use classification",
    "Land use classification/Regional Land use classification",
    "Object properties/Object classification",
    "Object properties/Object color",
    "Object properties/Object motion state",
    "Object spatial relationship/Object spatial relationship",
)
XLRS_MULTI_ANSWER_CATEGORY = "Land use classification/Overall Land use classification"
MME_REMOTE_SENSING = "Remote Sensing"


# ---------------------------------------------------------------------------------------------
# Shared helpers.


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have its published layout; the message names the file and the field."""


def _fs(uri: str, storage: StorageConfig | None) -> fsspec.AbstractFileSystem:
    return (storage or StorageConfig()).filesystem(uri)


def _parent(uri: str) -> str:
    """The folder holding `uri` (works for local paths and URIs alike)."""
    if uri_protocol(uri) is None:
        return os.path.dirname(os.path.abspath(uri))
    return posixpath.dirname(uri.rstrip("/"))


def _resolve(root: str, relative: str) -> str:
    """`relative` under `root`, unless it is already absolute or a URI."""
    if uri_protocol(relative) is not None or os.path.isabs(relative):
        return relative
    return join_uri(root, relative)


def _require(record: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [name for name in fields if name not in record]
    if missing:
        raise BenchmarkFormatError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")


def _require_str(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise BenchmarkFormatError(f"{where}: {name!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _require_options(value: Any, name: str, where: str, letters: str) -> list[str]:
    """Options must be a list of strings lettered "(A) ...", "(B) ..." in order."""
    if not isinstance(value, list) or not value or not all(isinstance(option, str) for option in value):
        raise BenchmarkFormatError(f"{where}: {name!r} must be a non-empty list of strings, got {value!r}")
    for letter, option in zip(letters, value, strict=False):
        if not option.startswith(f"({letter})"):
            raise BenchmarkFormatError(f"{where}: option {option!r} of {name!r} should start with '({letter})'")
    if len(value) > len(letters):
        raise BenchmarkFormatError(f"{where}: {name!r} has {len(value)} options, at most {len(letters)} allowed")
    return value


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def _item(
    *,
    question_id: str,
    source: Benchmark,
    images: list[str],
    question: str,
    choices: list[str],
    answer: str,
    form: str,
    category: str,
    prompt: str,
    meta: dict[str, Any],
    subset: str | None = None,
    bbox: list[float] | None = None,
    object_size_px: float | None = None,
    small: bool | None = None,
) -> dict[str, Any]:
    return {
        "question_id": question_id,
        "source": source.value,
        "images": images,
        "question": question,
        "choices": choices,
        "answer": answer,
        "form": form,
        "category": category,
        "subset": subset,
        "prompt": prompt,
        "bbox": bbox,
        "object_size_px": object_size_px,
        "small": small,
        "meta": json.dumps(meta, sort_keys=True, default=str),
    }


def _check_unique_ids(table: pa.Table, uri: str) -> pa.Table:
    counts = Counter(table.column("question_id").to_pylist())
    duplicates = sorted(qid for qid, count in counts.items() if count > 1)
    if duplicates:
        raise BenchmarkFormatError(f"{redact(uri)}: duplicate question ids {duplicates[:5]}")
    return table


# ---------------------------------------------------------------------------------------------
# XLRS-Bench lite.

_XLRS_FIELDS = ("index", "image", "question", "multi-choice options", "answer", "category", "l2-category")
_DATA_SUFFIXES = (".parquet", ".arrow")
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"II+\x00", ".tif"),
    (b"MM\x00+", ".tif"),
)


def _image_suffix(head: bytes, path: str | None, where: str) -> str:
    """The file suffix of an image from its first bytes (or its published file name)."""
    for magic, suffix in _IMAGE_MAGIC:
        if head.startswith(magic):
            return suffix
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if path and Path(path).suffix:
        return Path(path).suffix.lower()
    raise BenchmarkFormatError(f"{where}: embedded image is not PNG, JPEG, TIFF or WebP (first bytes {head[:8]!r})")


def _check_image_column(schema: pa.Schema, path: str) -> None:
    """`image` must be a list of `datasets.Image` structs {bytes, path}."""
    kind = schema.field("image").type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (is_list and pa.types.is_struct(kind.value_type)):
        raise BenchmarkFormatError(
            f"{redact(path)}: column 'image' must be a list of {{bytes, path}} images, got {kind}"
        )
    names = {kind.value_type.field(k).name for k in range(kind.value_type.num_fields)}
    if names != {"bytes", "path"}:
        raise BenchmarkFormatError(
            f"{redact(path)}: 'image' structs must have fields bytes and path, got {sorted(names)}"
        )


def _data_files(uri: str, fs: fsspec.AbstractFileSystem) -> list[str]:
    """The Parquet/Arrow data files of a dataset: `uri` itself, or every one under the folder `uri`."""
    if not fs.exists(uri):
        raise FileNotFoundError(f"XLRS-Bench data not found: {redact(uri)}")
    if not fs.isdir(uri):
        return [uri]
    files = sorted(path for path in fs.find(uri) if path.endswith(_DATA_SUFFIXES))
    if not files:
        raise BenchmarkFormatError(f"{redact(uri)}: no .parquet or .arrow data files under this folder")
    protocol = uri_protocol(uri)
    return [f"{protocol}://{path}" if protocol and "://" not in path else path for path in files]


def _record_batches(path: str, fs: fsspec.AbstractFileSystem) -> Iterator[pa.RecordBatch]:
    """Record batches of one data file, without holding the whole file in memory.

    Parquet is read a few rows at a time (memory still grows with the row-group size: a few times
    one row group); Arrow files written by `datasets` are IPC streams, memory-mapped when local so
    their embedded images stay in the page cache, not on the heap (a remote Arrow file is read one
    record batch at a time).
    """
    if path.endswith(".parquet"):
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = [name for name in _XLRS_FIELDS if name in parquet.schema_arrow.names]
            yield from parquet.iter_batches(batch_size=4, columns=columns)
        return
    source = pa.memory_map(path) if uri_protocol(path) is None else fs.open(path, "rb")
    with source:
        try:
            reader = ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader


def _write_image(data: pa.Buffer, target: str, fs: fsspec.AbstractFileSystem) -> None:
    """Write an extracted image once; a complete earlier copy (named by its content, same size) is kept."""
    if fs.exists(target) and fs.size(target) == data.size:
        return
    if uri_protocol(target) is None:
        os.makedirs(_parent(target), exist_ok=True)
    with fs.open(target, "wb") as handle:
        handle.write(memoryview(data))


def _xlrs_images(
    index: str, images: pa.ListScalar, data_dir: str, image_dir: str, fs_out: fsspec.AbstractFileSystem, where: str
) -> list[str]:
    """URIs of one item's images; embedded ones are written out, one image in memory at a time.

    An extracted image is named by its content: XLRS asks several questions about one picture,
    which is then one file (read and encoded once by the VQA job), and two different names are
    two different pictures (what the swap control's pairing relies on).
    """
    if not images.is_valid or len(images) == 0:
        raise BenchmarkFormatError(f"{where}: 'image' must be a non-empty list of images")
    uris = []
    for k in range(len(images)):
        image = images[k]
        data = image["bytes"].as_buffer()  # zero-copy view into the batch
        path = image["path"].as_py()
        if data is not None and data.size:
            suffix = _image_suffix(data.slice(0, min(16, data.size)).to_pybytes(), path, where)
            target = join_uri(image_dir, f"{hashlib.sha256(memoryview(data)).hexdigest()[:24]}{suffix}")
            _write_image(data, target, fs_out)
            uris.append(target)
        elif path:
            uris.append(_resolve(data_dir, path))
        else:
            raise BenchmarkFormatError(f"{where}: image {k} has neither bytes nor a path")
    return uris


def default_image_dir(uri: str) -> str:
    """Where XLRS images extracted from `uri` go by default: a per-source folder in uhr's cache."""
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    return str(default_cache_dir() / "benchmarks" / "xlrs-lite" / digest)


def load_xlrs_lite(uri: str, *, image_dir: str | None = None, storage: StorageConfig | None = None) -> pa.Table:
    """XLRS-Bench lite from a Parquet/Arrow data file or a dataset folder (local or object store).

    Embedded images are written once to `image_dir` (default: `default_image_dir(uri)`) as
    `<index>_<k>.<png|jpg|tif|webp>`, in their published bytes; images stored as paths resolve
    against the data file's folder. Prompts: `xlrs_prompt`. A category outside the 13 published
    sub-tasks is an error, as in lmms-eval.
    """
    fs_in = _fs(uri, storage)
    image_dir = image_dir or default_image_dir(uri)
    fs_out = _fs(image_dir, storage)
    rows = []
    for path in _data_files(uri, fs_in):
        for batch in _record_batches(path, fs_in):
            missing = [name for name in _XLRS_FIELDS if name not in batch.schema.names]
            if missing:
                raise BenchmarkFormatError(f"{redact(path)}: missing column(s) {', '.join(map(repr, missing))}")
            _check_image_column(batch.schema, path)
            # Text fields as Python objects; images stay Arrow buffers until written (they are large).
            texts = batch.select([name for name in _XLRS_FIELDS if name != "image"]).to_pylist()
            for row, record in enumerate(texts):
                index = str(record["index"])
                where = f"{redact(path)} item {index}"
                category = _require_str(record["category"], "category", where)
                if category not in XLRS_SUBTASKS:
                    raise BenchmarkFormatError(f"{where}: unknown XLRS-Bench category {category!r}")
                question = _require_str(record["question"], "question", where)
                options = _require_options(record["multi-choice options"], "multi-choice options", where, "ABCDE")
                answer = _require_str(record["answer"], "answer", where)
                images = _xlrs_images(index, batch.column("image")[row], _parent(path), image_dir, fs_out, where)
                rows.append(
                    _item(
                        question_id=index,
                        source=Benchmark.XLRS_LITE,
                        images=images,
                        question=question,
                        choices=options,
                        answer=answer,
                        form="mc",
                        category=category,
                        prompt=xlrs_prompt(question, options, multi_answer=category == XLRS_MULTI_ANSWER_CATEGORY),
                        meta={"l2-category": record["l2-category"], "n_images": len(images)},
                    )
                )
    return _check_unique_ids(_to_table(rows), uri)


# ---------------------------------------------------------------------------------------------
# LRS-VQA.

_LRS_FIELDS = ("question_id", "image", "category", "text", "ground_truth")
_LRS_META_FIELDS = ("image_size", "rbox", "abs_size", "size_bin")


def lrs_vqa_subset(question_id: str) -> str:
    """The source dataset of an LRS-VQA question: the id's prefix before the first "_"."""
    return question_id.split("_")[0]


def load_lrs_vqa(uri: str, *, image_root: str | None = None, storage: StorageConfig | None = None) -> pa.Table:
    """LRS-VQA from its JSONL file; image paths resolve against `image_root`.

    `image_root` defaults to the folder above the JSONL's folder: the published file is
    `<root>/LRS_VQA/LRS_VQA_merged.jsonl` with images `LRS_VQA/image/<n>.tif`. Items without a
    ground truth or a category are skipped (and counted in a warning), as LRS-VQA's scorer does.
    """
    fs = _fs(uri, storage)
    if not fs.exists(uri):
        raise FileNotFoundError(f"LRS-VQA question file not found: {redact(uri)}")
    image_root = image_root or _parent(_parent(uri))
    rows, skipped = [], 0
    with fs.open(uri, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{redact(uri)} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkFormatError(f"{where}: not JSON ({error.msg})") from None
            _require(record, _LRS_FIELDS, where)
            if not record["ground_truth"] or not record["category"]:
                skipped += 1
                continue
            question_id = _require_str(record["question_id"], "question_id", where)
            text = _require_str(record["text"], "text", where)
            hbox = record.get("hbox")
            rows.append(
                _item(
                    question_id=question_id,
                    source=Benchmark.LRS_VQA,
                    images=[_resolve(image_root, _require_str(record["image"], "image", where))],
                    question=text,
                    choices=[],
                    answer=_require_str(record["ground_truth"], "ground_truth", where),
                    form="open",
                    category=_require_str(record["category"], "category", where),
                    prompt=lrs_vqa_prompt(text),
                    subset=lrs_vqa_subset(question_id),
                    bbox=[float(v) for v in hbox] if hbox else None,
                    meta={name: record[name] for name in _LRS_META_FIELDS if name in record},
                )
            )
    if skipped:
        logger.warning("%s: skipped %d item(s) without ground_truth or category", redact(uri), skipped)
    return _check_unique_ids(_to_table(rows), uri)


# ---------------------------------------------------------------------------------------------
# MME-RealWorld, remote-sensing split.

_MME_FIELDS = ("Question_id", "Image", "Text", "Answer choices", "Ground truth", "Subtask", "Category")
_MME_META_FIELDS = ("Task", "Dataset", "Question Type", "Category")


def mme_category(category: str) -> str:
    """The category MME-RealWorld's scorer reports by: lower-cased, "<x>/attribute..." folded to "<x>/attribute"."""
    category = category.lower()
    if "attribute" in category:
        category = category.split("/")[0] + "/attribute"
    return category


def load_mme_realworld_rs(
    uri: str,
    *,
    image_root: str | None = None,
    prompt_style: MmePromptStyle = MmePromptStyle.LRS_VQA,
    storage: StorageConfig | None = None,
) -> pa.Table:
    """The remote-sensing questions of an MME-RealWorld JSON file (others are left out).

    Image paths resolve against `image_root`, by default the JSON's folder. Categories are
    lower-cased as MME-RealWorld's scorer does ("position", "color", "count").
    """
    fs = _fs(uri, storage)
    if not fs.exists(uri):
        raise FileNotFoundError(f"MME-RealWorld question file not found: {redact(uri)}")
    image_root = image_root or _parent(uri)
    with fs.open(uri, "rt", encoding="utf-8") as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as error:
            raise BenchmarkFormatError(f"{redact(uri)}: not a JSON file ({error.msg})") from None
    if not isinstance(records, list):
        raise BenchmarkFormatError(f"{redact(uri)}: expected a JSON list of questions, got {type(records).__name__}")
    rows = []
    for position, record in enumerate(records):
        where = f"{redact(uri)} item {position}"
        if not isinstance(record, dict):
            raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        _require(record, _MME_FIELDS, where)
        if record["Subtask"] != MME_REMOTE_SENSING:
            continue
        text = _require_str(record["Text"], "Text", where)
        options = _require_options(record["Answer choices"], "Answer choices", where, "ABCDE")
        truth = _require_str(record["Ground truth"], "Ground truth", where)
        if len(truth) != 1 or truth not in "ABCDE"[: len(options)]:
            raise BenchmarkFormatError(f"{where}: 'Ground truth' must be one option letter, got {truth!r}")
        rows.append(
            _item(
                question_id=str(record["Question_id"]),
                source=Benchmark.MME_REALWORLD_RS,
                images=[_resolve(image_root, _require_str(record["Image"], "Image", where))],
                question=text,
                choices=options,
                answer=truth,
                form="mc",
                category=mme_category(_require_str(record["Category"], "Category", where)),
                prompt=mme_realworld_prompt(text, options, prompt_style),
                meta={name: record[name] for name in _MME_META_FIELDS if name in record},
            )
        )
    if not rows:
        raise BenchmarkFormatError(f"{redact(uri)}: no questions with Subtask == {MME_REMOTE_SENSING!r}")
    return _check_unique_ids(_to_table(rows), uri)


# ---------------------------------------------------------------------------------------------
# Synthetic archive (uhr.synth).

_SYNTH_FIELDS = (
    "question_id", "scene", "question", "choices", "answer", "category", "bbox", "object_size_px", "small", "form",
)  # fmt: skip
SYNTHETIC_QUESTIONS = "questions.parquet"


def load_synthetic(uri: str, *, storage: StorageConfig | None = None) -> pa.Table:
    """A synthetic archive's questions: `uri` is the archive root or its `questions.parquet`.

    Scene paths resolve against the archive root. Prompts are the ones the archive's training
    conversations use (`uhr.synth.question_prompt`), so a model is evaluated on what it was trained on.
    `small` is null where the question depends on no single object (`object_size_px` null).
    """
    path = uri if uri.endswith(".parquet") else join_uri(uri, SYNTHETIC_QUESTIONS)
    fs = _fs(path, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"synthetic questions not found: {redact(path)}")
    root = _parent(path)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    missing = [name for name in _SYNTH_FIELDS if name not in table.column_names]
    if missing:
        raise BenchmarkFormatError(f"{redact(path)}: missing column(s) {', '.join(map(repr, missing))}")
    rows = []
    for record in table.to_pylist():
        where = f"{redact(path)} question {record['question_id']}"
        form = record["form"]
        if form not in ("mc", "open"):
            raise BenchmarkFormatError(f"{where}: 'form' must be 'mc' or 'open', got {form!r}")
        choices = _require_options(record["choices"], "choices", where, "ABCDE") if form == "mc" else []
        question = _require_str(record["question"], "question", where)
        rows.append(
            _item(
                question_id=str(record["question_id"]),
                source=Benchmark.SYNTHETIC,
                images=[_resolve(root, _require_str(record["scene"], "scene", where))],
                question=question,
                choices=choices,
                answer=_require_str(record["answer"], "answer", where),
                form=form,
                category=_require_str(record["category"], "category", where),
                prompt=question_prompt(question, choices, form),
                bbox=[float(v) for v in record["bbox"]] if record["bbox"] is not None else None,
                object_size_px=record["object_size_px"],
                small=None if record["object_size_px"] is None else bool(record["small"]),
                meta={name: record[name] for name in ("answer_text", "seed") if name in record},
            )
        )
    return _check_unique_ids(_to_table(rows), path)


# ---------------------------------------------------------------------------------------------
# One entry point for jobs.


class BenchmarkSpec(BaseModel):
    """Which benchmark to load, and from where."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Benchmark = Field(description="The benchmark: xlrs-lite, lrs-vqa, mme-realworld-rs or synthetic.")
    uri: str = Field(
        description="Local path or object-store URI: XLRS data file or dataset folder; LRS-VQA JSONL; "
        "MME-RealWorld JSON; synthetic archive root or its questions.parquet."
    )
    image_root: str | None = Field(
        default=None,
        description="Folder that relative image paths resolve against (LRS-VQA, MME-RealWorld); "
        "None: the published layout's default (see the loaders).",
    )
    image_dir: str | None = Field(
        default=None,
        description="Where XLRS-Bench's embedded images are written out once; None: uhr's cache folder. "
        "Use an object-store URI when cluster workers must read them.",
    )
    mme_prompt: MmePromptStyle = Field(
        default=MmePromptStyle.LRS_VQA, description="Which published MME-RealWorld prompt to build."
    )


def load_benchmark(spec: BenchmarkSpec, storage: StorageConfig | None = None) -> pa.Table:
    """The item table (`ITEM_SCHEMA`) of the benchmark `spec` names."""
    if spec.name == Benchmark.XLRS_LITE:
        return load_xlrs_lite(spec.uri, image_dir=spec.image_dir, storage=storage)
    if spec.name == Benchmark.LRS_VQA:
        return load_lrs_vqa(spec.uri, image_root=spec.image_root, storage=storage)
    if spec.name == Benchmark.MME_REALWORLD_RS:
        return load_mme_realworld_rs(
            spec.uri, image_root=spec.image_root, prompt_style=spec.mme_prompt, storage=storage
        )
    return load_synthetic(spec.uri, storage=storage)
