"""The VQA job's output: a GeoParquet dataset of answer rows and a run manifest, both resumable.

Rows are written by the driver as they stream out of Ray Data, in part files named after the run
(`part-<run_id>-<n>.parquet`, `n` counting on from the parts an earlier run of the same `run_id`
left, so a rerun never replaces them). A part appears whole or not at all (local parts are renamed
into place; object-store uploads become visible on completion), so an interrupted run leaves only
complete parts and the next run skips exactly the questions they hold. Error rows are the exception,
and rows answered from another number of images than the question now has (a multi-image question
answered by an older uhr from its first image): a resume takes them out of their parts (`drop_rows`,
each part rewritten whole) and asks their questions again.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uhr.config import ConfigError
from uhr.storage import StorageConfig, is_remote, join_uri, redact

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_run.json"
PART_GLOB = "part-*.parquet"


class OutputError(ConfigError):
    """The output dataset cannot be read as a resume needs (the store failed, not the data): the job
    stops before any work and changes nothing."""


OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("scene", pa.string(), nullable=False),
        pa.field("extra_scenes", pa.list_(pa.string())),
        pa.field("question", pa.string(), nullable=False),
        pa.field("choices", pa.list_(pa.string())),
        pa.field("bbox", pa.list_(pa.float64())),
        pa.field("answer", pa.string()),
        pa.field("choice", pa.string()),
        pa.field("error", pa.string()),
        pa.field("tokens_dense", pa.int64()),
        pa.field("tokens_kept", pa.int64()),
        pa.field("tokens_per_scale", pa.list_(pa.int64())),
        pa.field("evidence_tokens", pa.int64()),
        pa.field("evidence_px", pa.float64()),
        pa.field("bytes_read", pa.int64()),
        pa.field("read_ms", pa.float64()),
        pa.field("encode_ms", pa.float64()),
        pa.field("answer_ms", pa.float64()),
        pa.field("model", pa.string()),
        pa.field("strategy", pa.string()),
        pa.field("budget", pa.int64()),
        pa.field("run_id", pa.string()),
        pa.field("footprint", pa.binary()),
    ]
)


def geo_metadata(footprints: list[bytes | None]) -> dict[str, Any]:
    """GeoParquet 1.1 file metadata for the WKB `footprint` column (lon/lat, OGC:CRS84)."""
    from shapely import from_wkb

    bounds = [from_wkb(wkb).bounds for wkb in footprints if wkb is not None]
    # A footprint across the antimeridian is split there into a MultiPolygon (`uhr.scenes.reader`).
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon", "MultiPolygon"]}
    if bounds:
        column["bbox"] = [
            min(b[0] for b in bounds),
            min(b[1] for b in bounds),
            max(b[2] for b in bounds),
            max(b[3] for b in bounds),
        ]
    return {"version": "1.1.0", "primary_column": "footprint", "columns": {"footprint": column}}


def _part_paths(output: str, storage: StorageConfig) -> list[str]:
    fs = storage.filesystem(output)
    if is_remote(output):
        fs.invalidate_cache()
    paths = sorted(fs.glob(join_uri(output, PART_GLOB)))
    # Object-store filesystems list keys without their protocol; put it back so paths are URIs.
    return [fs.unstrip_protocol(p) for p in paths] if is_remote(output) else paths


# What a resumed run needs of the rows already written: which questions to skip (and whether they
# were asked of the images they have now), and their choices to score.
DONE_COLUMNS = ("question_id", "error", "choice", "extra_scenes")


class _RecordingFile:
    """A storage file that remembers an error from its own reads, so that one is told apart from
    pyarrow's errors on bad content (which are OSErrors too, for some kinds of damage). It offers
    pyarrow only `seek`, `tell` and `read`, so every byte goes through `read`."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.error: OSError | None = None

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def seek(self, *args: Any) -> int:
        return self.handle.seek(*args)

    def tell(self) -> int:
        return self.handle.tell()

    def read(self, *args: Any) -> bytes:
        try:
            return self.handle.read(*args)
        except OSError as err:
            self.error = err
            raise


def _read_part(path: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table | None:
    """The rows of one part (only `columns`, fetched with ranged reads); None when its content is
    not Parquet (cut short, damaged).

    An I/O error (a store that throttles or times out, a part that cannot be opened) is told apart
    from a corrupt part: it raises `OutputError` naming the part.
    """
    fs = storage.filesystem(path)

    def unreadable(err: OSError) -> OutputError:
        return OutputError(
            f"output part {redact(path)} cannot be read ({type(err).__name__}: {redact(str(err))}); "
            "nothing was changed: run again when the store answers"
        )

    try:
        # No read-ahead: object-store files otherwise fetch a whole block (s3fs: 50 MB) per read.
        handle = fs.open(path, "rb", cache_type="none")
    except OSError as err:
        raise unreadable(err) from err
    with handle:
        source = _RecordingFile(handle)
        try:
            part = pq.ParquetFile(source)
            present = None if columns is None else [name for name in columns if name in part.schema_arrow.names]
            table = part.read(columns=present)
        except (pa.ArrowException, OSError, ValueError) as err:
            if source.error is not None:
                raise unreadable(source.error) from err
            return None
    return _conform(table, columns or OUTPUT_SCHEMA.names, path)


def _conform(table: pa.Table, names: list[str] | tuple[str, ...], path: str = "") -> pa.Table:
    """The columns `names` of `table`, typed as in `OUTPUT_SCHEMA`; a column that parts written by
    an older uhr lack (`extra_scenes`) comes in as nulls, so the dataset keeps one schema.

    A column whose values cannot take uhr's type (a part some other program wrote into the output)
    raises `OutputError` naming the part `path` and the column: resuming over it would
    answer its questions twice or rewrite it.
    """
    columns = []
    for name in names:
        field = OUTPUT_SCHEMA.field(name)
        if name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        try:
            columns.append(table[name].cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise OutputError(
                f"output part {redact(path)}: column {name!r} is {table.schema.field(name).type}, uhr writes {field.type} "
                f"({err}); uhr cannot resume over it: move it out of the output, or write to another --output"
            ) from err
    return pa.table(columns, schema=pa.schema([OUTPUT_SCHEMA.field(name) for name in names]))


def _set_aside(path: str, storage: StorageConfig) -> None:
    logger.warning("output part %s is not valid Parquet; renamed *.unreadable, its questions will be answered again", redact(path))
    storage.filesystem(path).mv(path, path + ".unreadable")


def read_done(output: str, storage: StorageConfig) -> pa.Table:
    """`DONE_COLUMNS` of every row already in `output` (empty table if none).

    A part whose content is not valid Parquet (cut short by a crash of another writer, or damaged)
    is renamed `*.unreadable` with a warning, so its questions are answered again instead of failing
    the run. A part that cannot be fetched (an I/O error) stops the job with `OutputError`: hiding a
    valid part would answer its questions twice.
    """
    tables = []
    for path in _part_paths(output, storage):
        table = _read_part(path, storage, list(DONE_COLUMNS))
        if table is None:
            _set_aside(path, storage)
        else:
            tables.append(table)
    return pa.concat_tables(tables) if tables else _conform(pa.table({}), DONE_COLUMNS)


def _write_part(path: str, table: pa.Table, storage: StorageConfig) -> None:
    """Write `table` (`OUTPUT_SCHEMA`) at `path` with its GeoParquet metadata, whole or not at all."""
    fs = storage.filesystem(path)
    geo = geo_metadata(table.column("footprint").to_pylist())
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    if is_remote(path):
        # Serialised first, then put in one call: an object becomes visible only when its upload
        # completes, and an error while writing uploads nothing (an fsspec file leaving a `with`
        # block on an exception still closes, i.e. uploads, what it holds).
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        fs.pipe_file(path, sink.getvalue().to_pybytes())
    else:
        staging = path + ".tmp"
        with fs.open(staging, "wb") as handle:
            pq.write_table(table, handle)
        fs.mv(staging, path)


def drop_rows(output: str, storage: StorageConfig, question_ids: set[str]) -> int:
    """Take every row of `question_ids` out of `output`'s parts; returns how many were dropped.

    Each part holding any is rewritten without them in one step (replaced whole, deleted when
    nothing is left), so an interruption leaves every part either as it was or without those rows:
    their questions are simply not done, and the next run asks them.
    """
    dropped = 0
    fs = storage.filesystem(output)
    for path in _part_paths(output, storage):
        ids = _read_part(path, storage, ["question_id"])
        if ids is None:
            continue
        # Membership in the Python set: pc.is_in would hash all of `question_ids` again for every part.
        drop = pa.array([qid in question_ids for qid in ids["question_id"].to_pylist()], pa.bool_())
        if not pc.any(drop).as_py():
            continue
        table = _read_part(path, storage)  # the same rows in the same order, every column
        if table is None:
            continue
        rest = table.filter(pc.invert(drop))
        dropped += table.num_rows - rest.num_rows
        if rest.num_rows:
            _write_part(path, rest, storage)
        else:
            fs.rm(path)
    return dropped


def clear_output(output: str, storage: StorageConfig) -> None:
    """Delete the parts and manifest of `output` (for `--overwrite`)."""
    fs = storage.filesystem(output)
    for path in _part_paths(output, storage):
        fs.rm(path)
    manifest = join_uri(output, MANIFEST_NAME)
    if fs.exists(manifest):
        fs.rm(manifest)


class ResultWriter:
    """Buffers answer rows and writes them as GeoParquet part files under `output`.

    A part is written when `rows_per_file` rows are buffered, and, while the writer is open as a
    context manager, by a timer whenever rows have waited `flush_interval_s` seconds; leaving the
    context (normally or by an exception, Ctrl-C included) writes the rest. Part numbers continue
    after those an earlier run of the same `run_id` left under `output`.
    """

    def __init__(self, output: str, run_id: str, storage: StorageConfig, rows_per_file: int, flush_interval_s: float):
        self.output = output
        self.run_id = run_id
        self.storage = storage
        self.fs = storage.filesystem(output)
        self.rows_per_file = rows_per_file
        self.flush_interval_s = flush_interval_s
        self.rows_written = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._flush_when_due, name="uhr-writer", daemon=True)
        self._last_flush = time.monotonic()
        self.fs.makedirs(output, exist_ok=True)
        self._parts = self._next_part_number()

    def _next_part_number(self) -> int:
        pattern = re.compile(rf"part-{re.escape(self.run_id)}-(\d+)\.parquet(\.unreadable)?$")
        fs = self.fs
        if is_remote(self.output):
            fs.invalidate_cache()
        names = [path.rsplit("/", 1)[-1] for path in fs.glob(join_uri(self.output, f"part-{self.run_id}-*"))]
        numbers = [int(match.group(1)) for name in names if (match := pattern.match(name))]
        return max(numbers, default=-1) + 1

    def __enter__(self) -> ResultWriter:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._timer.join()
        self.close()

    def write(self, rows: pa.Table) -> None:
        """Add rows (any column order; `OUTPUT_SCHEMA` columns) and flush when a file is full or due."""
        with self._lock:
            self._buffer.append(rows.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
            self._buffered += rows.num_rows
            while self._buffered >= self.rows_per_file:
                self._flush(self.rows_per_file)
            if self._buffered and time.monotonic() - self._last_flush >= self.flush_interval_s:
                self._flush(self._buffered)

    def close(self) -> None:
        """Write whatever is buffered."""
        with self._lock:
            if self._buffered:
                self._flush(self._buffered)

    def _flush_when_due(self) -> None:
        while not self._stop.wait(min(self.flush_interval_s, 1.0)):
            with self._lock:
                if self._buffered and time.monotonic() - self._last_flush >= self.flush_interval_s:
                    self._flush(self._buffered)

    def _flush(self, count: int) -> None:
        table = pa.concat_tables(self._buffer)
        part, rest = table.slice(0, count), table.slice(count)
        _write_part(join_uri(self.output, f"part-{self.run_id}-{self._parts:05d}.parquet"), part, self.storage)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        self._parts += 1
        self.rows_written += part.num_rows
        self._last_flush = time.monotonic()


@dataclass
class RunManifest:
    """`_run.json`: the latest config, versions, dataset counts and the history of runs."""

    output: str
    storage: StorageConfig
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return join_uri(self.output, MANIFEST_NAME)

    @classmethod
    def load(cls, output: str, storage: StorageConfig) -> RunManifest:
        fs = storage.filesystem(output)
        manifest = cls(output=output, storage=storage)
        if fs.exists(manifest.path):
            with fs.open(manifest.path, "rt") as handle:
                manifest.data = json.load(handle)
        manifest.data.setdefault("runs", [])
        return manifest

    def save(self) -> None:
        fs = self.storage.filesystem(self.output)
        fs.makedirs(self.output, exist_ok=True)
        text = json.dumps(self.data, indent=2, sort_keys=True)
        if is_remote(self.path):
            with fs.open(self.path, "wt") as handle:
                handle.write(text)
        else:
            with fs.open(self.path + ".tmp", "wt") as handle:
                handle.write(text)
            fs.mv(self.path + ".tmp", self.path)
