"""Resuming a fine-tuning run on another number of workers, through DeepSpeed's universal checkpoint.

Under ZeRO-1/2 each rank's checkpoint file holds its 1/world slice of the float32 master weights
and Adam moments, flattened per parameter group, so a checkpoint loads only on as many ranks as
wrote it. DeepSpeed's `ds_to_universal` rewrites such a checkpoint as one folder per parameter
(its master weights, both moments and the step, unpartitioned), which any number of ranks loads
with `checkpoint.load_universal`. An autoscaling cluster that lost a GPU node, or a run moved to a
bigger one, can then go on from its last checkpoint instead of starting over.

A worker group that starts from a checkpoint another number of workers wrote (as its
`uhr.train.resume.checkpoint_settings` say: a re-run with another `scaling.num_workers`, or an
elastic group restarted at another size) has its rank 0 convert it, once, into a folder beside the
original inside the same checkpoint (`UNIVERSAL_TAG`), marked complete last (`UNIVERSAL_DONE`; a
conversion cut short is redone), while the other ranks wait; then every rank loads that folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

from uhr.storage import StorageConfig, join_uri, redact
from uhr.train.resume import CHECKPOINT_TAG

logger = logging.getLogger(__name__)

UNIVERSAL_TAG = "deepspeed-universal"
"""Sub-directory of a checkpoint holding its engine state in DeepSpeed's universal format."""

UNIVERSAL_DONE = "uhr_universal.json"
"""Written into `UNIVERSAL_TAG` once the whole conversion is stored."""


def convert_to_universal(checkpoint_uri: str, storage: StorageConfig) -> str:
    """Write the universal form of the checkpoint at `checkpoint_uri` into its `UNIVERSAL_TAG`
    folder (once: a complete conversion is kept); returns that folder's URI."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    fs = storage.filesystem(checkpoint_uri)
    target = join_uri(checkpoint_uri, UNIVERSAL_TAG)
    if fs.exists(join_uri(target, UNIVERSAL_DONE)):
        return target
    if fs.exists(target):  # a conversion cut short
        fs.rm(target, recursive=True)
    with tempfile.TemporaryDirectory(prefix="uhr-universal-") as directory:
        source, converted = Path(directory) / CHECKPOINT_TAG, Path(directory) / "out" / UNIVERSAL_TAG
        fs.get(join_uri(checkpoint_uri, CHECKPOINT_TAG), str(source), recursive=True)
        arguments = SimpleNamespace(
            input_folder=str(source),
            output_folder=str(converted),
            # One process: a pool of workers would each load a rank's file into this node's memory at once.
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # Our checkpoints do not record DeepSpeed's `universal_checkpoint_info`; its default is right for
            # a model without tensor or pipeline parallelism.
            inject_missing_state=True,
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):  # per-step prints and bars
            ds_to_universal(arguments)
        fs.put(str(converted), target, recursive=True)
        with fs.open(join_uri(target, UNIVERSAL_DONE), "w") as file:
            json.dump({"source": CHECKPOINT_TAG, "parameters": sum(1 for _ in (converted / "zero").iterdir())}, file)
    logger.info("converted %s to a universal checkpoint", redact(checkpoint_uri))
    return target


__all__ = ["UNIVERSAL_DONE", "UNIVERSAL_TAG", "convert_to_universal"]
