"""Reading a VQA run's output the way a user would, and building configs as the CLI does."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from uhr.config import load_config
from uhr.pipeline import MANIFEST_NAME, VqaConfig
from uhr.storage import StorageConfig

# Stands for a credential that reached a path or message (a test fake, no real secret): `redact`
# masks this process's AWS secret wherever it appears, so tests set it as AWS_SECRET_ACCESS_KEY.
FAKE_SECRET = "uhr-not-a-real-secret-0123456789"


def read_rows(output: str, storage: StorageConfig | None = None) -> pa.Table:
    """Every answer row under `output`, through the same filesystem a user would use."""
    fs = (storage or StorageConfig()).filesystem(output)
    parts = sorted(fs.glob(f"{output.rstrip('/')}/part-*.parquet"))
    assert parts, f"no output parts under {output}"
    tables = []
    for part in parts:
        with fs.open(part, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def read_manifest(output: str, storage: StorageConfig | None = None) -> dict:
    fs = (storage or StorageConfig()).filesystem(output)
    with fs.open(f"{output.rstrip('/')}/{MANIFEST_NAME}", "rt") as handle:
        return json.load(handle)


def scored_by_hand(rows: pa.Table, questions: pa.Table) -> tuple[int, int]:
    """(multiple-choice rows, those whose chosen letters are the reference's letter set), from the
    rows and the questions' `answer` column: what a run summary's `scored` and `correct` must be."""
    truth = dict(zip(questions["question_id"].to_pylist(), questions["answer"].to_pylist()))
    scored = [row for row in rows.to_pylist() if row["choices"]]
    return len(scored), sum(set(row["choice"] or "") == set(truth[row["question_id"]]) for row in scored)


def config(**fields) -> VqaConfig:
    overrides = [f"{key}={value}" for key, value in fields.pop("overrides", {}).items()]
    return load_config(VqaConfig, overrides=overrides, **fields)
