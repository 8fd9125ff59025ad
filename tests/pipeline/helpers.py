"""Reading a VQA run's output the way a user would, and building configs as the CLI does."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from uhr.config import load_config
from uhr.pipeline import MANIFEST_NAME, VqaConfig
from uhr.storage import StorageConfig


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


def config(**fields) -> VqaConfig:
    overrides = [f"{key}={value}" for key, value in fields.pop("overrides", {}).items()]
    return load_config(VqaConfig, overrides=overrides, **fields)
