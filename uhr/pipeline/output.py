"""The VQA job's output: a GeoParquet dataset of answer rows and a run manifest, both resumable.

Rows are written by the driver as they stream out of Ray Data, in part files named after the run
(`part-<run_id>-<n>.parquet`). A part appears whole or not at all (local parts are renamed into
place; object-store uploads become visible on completion), so an interrupted run leaves only
complete parts and the next run skips exactly the questions they hold.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uhr.storage import StorageConfig, is_remote, join_uri, redact

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_run.json"
PART_GLOB = "part-*.parquet"

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("scene", pa.string(), nullable=False),
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
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"]}
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


# What a resumed run needs of the rows already written: which questions to skip, and their choices to score.
DONE_COLUMNS = ("question_id", "error", "choice")


def read_done(output: str, storage: StorageConfig) -> pa.Table:
    """`question_id`, `error` and `choice` of every row already in `output` (empty table if none).

    A part that cannot be read (cut short by a crash of another writer, or damaged) is renamed
    `*.unreadable` with a warning, so its questions are answered again instead of failing the run.
    """
    fs = storage.filesystem(output)
    tables = []
    for path in _part_paths(output, storage):
        try:
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=list(DONE_COLUMNS)))
        except (pa.ArrowInvalid, OSError) as err:
            logger.warning("output part %s is unreadable (%s); its questions will be answered again", redact(path), err)
            fs.mv(path, path + ".unreadable")
    if not tables:
        return pa.table({name: pa.array([], pa.string()) for name in DONE_COLUMNS})
    return pa.concat_tables(tables)


def clear_output(output: str, storage: StorageConfig) -> None:
    """Delete the parts and manifest of `output` (for `--overwrite`)."""
    fs = storage.filesystem(output)
    for path in _part_paths(output, storage):
        fs.rm(path)
    manifest = join_uri(output, MANIFEST_NAME)
    if fs.exists(manifest):
        fs.rm(manifest)


class ResultWriter:
    """Buffers answer rows and writes them as GeoParquet part files under `output`."""

    def __init__(self, output: str, run_id: str, storage: StorageConfig, rows_per_file: int, flush_interval_s: float):
        self.output = output
        self.run_id = run_id
        self.storage = storage
        self.fs = storage.filesystem(output)
        self.rows_per_file = rows_per_file
        self.flush_interval_s = flush_interval_s
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._parts = 0
        self._last_flush = time.monotonic()
        self.fs.makedirs(output, exist_ok=True)

    def write(self, rows: pa.Table) -> None:
        """Add rows (any column order; `OUTPUT_SCHEMA` columns) and flush when a file is full or due."""
        self._buffer.append(rows.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
        self._buffered += rows.num_rows
        while self._buffered >= self.rows_per_file:
            self._flush(self.rows_per_file)
        if self._buffered and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self._flush(self._buffered)

    def close(self) -> None:
        """Write whatever is buffered."""
        if self._buffered:
            self._flush(self._buffered)

    def _flush(self, count: int) -> None:
        table = pa.concat_tables(self._buffer)
        part, rest = table.slice(0, count), table.slice(count)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        geo = geo_metadata(part.column("footprint").to_pylist())
        part = part.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
        path = join_uri(self.output, f"part-{self.run_id}-{self._parts:05d}.parquet")
        if is_remote(path):
            # An object becomes visible only when its upload completes: no partial part is ever listed.
            with self.fs.open(path, "wb") as handle:
                pq.write_table(part, handle)
        else:
            staging = path + ".tmp"
            with self.fs.open(staging, "wb") as handle:
                pq.write_table(part, handle)
            self.fs.mv(staging, path)
        self._parts += 1
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
