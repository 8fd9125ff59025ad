"""Training data: LLaVA conversation manifests -> prepared samples streamed to the workers.

Ray Data reads the manifest (JSONL line by line, or a JSON list record by record) and a CPU stage
prepares each record: it resolves the image against the image root, reads exactly the whole-scene
views the pruning strategy's `encode` will ask for (`strategy.views(model_config, w, h)`), renders
the conversation with the chat template and labels the answer tokens only. A record that cannot be
used (bad JSON, missing fields, unreadable image, no image token, nothing left to learn after the
length cut) is skipped with its reason logged and recorded in a `SkipLedger`; it never fails the run.

A record may name a `window` of its image, `[col_off, row_off, width, height]` in full-resolution
pixels: the sample is then that region, seen by the strategy as a whole scene of its own (training
on the annotated part of a scene too large to be useful at one view, without cutting files).
It may also name the question's evidence, `bbox` `[x0, y0, x1, y1]` in the image's pixels, which
the grounding loss (`uhr.train.grounding`) uses; it must overlap the window.

A record's `image` may be a list of paths, one per `<image>` placeholder in order (LLaVA-OneVision's
multi-image form; XLRS-Bench's bi-temporal pairs): every image is read and pruned on its own with
the same question (the text of the first turn that holds an image, as for one image; a later turn
naming another image does not re-select it), each placeholder becomes its image's tokens
(`UhrForConditionalGeneration.forward`), a `window` applies to every image (co-registered pairs)
and `bbox` is in the first image's pixels.

Prepared sample row: `id`, `image` (URI), `window` (the region used; the whole image when the
record names none), `question` (the text query-guided strategies select with), `bbox` (the
evidence in the window's pixels, clipped to it; None without one), `input_ids`,
`labels`, `width`, `height` (of the window), `views` (raw RGB bytes), `view_shapes`, and
`extra_images` (a multi-image record's further images, each with its own `image`, `window`,
`width`, `height`, `views` and `view_shapes`; empty for one image). A training worker wraps each
image's views in a `PreparedSource` for the strategy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import torch
from fsspec.core import split_protocol
from transformers import PreTrainedTokenizerBase

from uhr.config import ConfigError
from uhr.model import IGNORE_INDEX, load_model_config, tokenize_conversation
from uhr.model import load_tokenizer as checkpoint_tokenizer
from uhr.model.config import UhrConfig
from uhr.model.pruning import PruningStrategy, build_strategy
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.reads import decode_views
from uhr.scenes import Box, Scene, WindowSource, open_scene
from uhr.scenes.normalize import NormalizeConfig
from uhr.storage import StorageConfig, is_remote, join_uri, redact, uri_protocol

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".json", ".jsonl")


# ----------------------------------------------------------------------------------------------
# Tokenizer (the CPU stage needs it without the weights)
# ----------------------------------------------------------------------------------------------


def load_tokenizer(model_uri: str, storage: StorageConfig) -> PreTrainedTokenizerBase:
    """The tokenizer `uhr.model.load_model(model_uri)` attaches (`uhr.model.load_tokenizer`), checked
    against the model's image token: the CPU stage tokenises exactly as the model's prompts do."""
    model_config = load_model_config(model_uri, storage=storage)
    tokenizer = checkpoint_tokenizer(model_uri, storage=storage)
    image_id = tokenizer.convert_tokens_to_ids(model_config.image_token)
    if model_config.image_token_id is not None and image_id != model_config.image_token_id:
        raise ConfigError(
            f"model {redact(model_uri)}: tokenizer maps {model_config.image_token!r} to {image_id}, "
            f"the model expects {model_config.image_token_id}"
        )
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Skipped samples
# ----------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class SkipLedger:
    """Samples the CPU stage skipped, by sample key, with the reason (a run-long Ray actor).

    A record is counted by its key and a digest of its text, which makes the count exact however
    often it is seen (every epoch, and again after a worker-group restart, reads the manifest anew)
    and tells apart records sharing an id (a manifest may hold one per conversation about an image).
    """

    def __init__(self) -> None:
        self._reasons: dict[tuple[str, str], str] = {}

    def add(self, key: str, digest: str, reason: str) -> None:
        self._reasons.setdefault((key, digest), reason)

    def summary(self, examples: int = 5) -> dict[str, Any]:
        """{"count": n, "by_kind": {kind: n}, "examples": [(key, reason), ...]}."""
        kinds = Counter(reason.split(":", 1)[0] for reason in self._reasons.values())
        return {
            "count": len(self._reasons),
            "by_kind": dict(kinds.most_common()),
            "examples": sorted((key, reason) for (key, _), reason in self._reasons.items())[:examples],
        }


# ----------------------------------------------------------------------------------------------
# Manifest reading
# ----------------------------------------------------------------------------------------------


def arrow_filesystem(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem | None, str]:
    """(pyarrow filesystem, path) for Ray's readers and `RunConfig(storage_filesystem=...)`.

    Local paths get (None, path); object stores go through the project's fsspec filesystem (so a
    custom endpoint and its options apply), with the protocol stripped from the path.
    """
    if not is_remote(uri):
        return None, os.path.abspath(split_protocol(uri)[1] if uri_protocol(uri) else uri)
    handler = pafs.FSSpecHandler(storage.filesystem(uri))
    return pafs.PyFileSystem(handler), split_protocol(uri)[1]


def _json_list_records(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON manifest file (a list of records) -> one row per record, each as its JSON text.

    A file that is no JSON list becomes one row with `error` set (skipped and counted downstream).
    """
    try:
        records = json.loads(row["bytes"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [{"record": None, "error": f"not valid JSON: {error}"}]
    if not isinstance(records, list):
        return [{"record": None, "error": f"a JSON manifest must be a list of records, got {type(records).__name__}"}]
    return [{"record": json.dumps(record), "error": None} for record in records]


def read_manifest(uri: str, storage: StorageConfig) -> ray.data.Dataset:
    """A Ray dataset of manifest records, one row {"record": <JSON text>[, "error"]} per record (unparsed).

    `.jsonl`: one record per non-empty line. `.json`: a list of records. Parsing happens in the
    preparation stage, so one bad record costs one sample, not the run.
    """
    suffix = next((s for s in MANIFEST_SUFFIXES if uri.lower().endswith(s)), None)
    if suffix is None:
        raise ConfigError(f"manifest {redact(uri)} must be .json (a list of records) or .jsonl (one record per line)")
    fs = storage.filesystem(uri)
    if not fs.exists(uri):
        raise ConfigError(f"manifest {redact(uri)} does not exist")
    filesystem, path = arrow_filesystem(uri, storage)
    if suffix == ".jsonl":
        return ray.data.read_text(path, filesystem=filesystem).rename_columns({"text": "record"})
    return ray.data.read_binary_files(path, filesystem=filesystem).flat_map(_json_list_records)


# ----------------------------------------------------------------------------------------------
# Sample preparation (CPU stage)
# ----------------------------------------------------------------------------------------------


class SampleError(ValueError):
    """A manifest record that cannot become a training sample; `kind` names the check that failed."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        super().__init__(f"{kind}: {detail}")

    def __reduce__(self):
        kind, _, detail = str(self).partition(": ")
        return (type(self), (kind, detail))


def image_uri(image: str, image_root: str) -> str:
    """`image` as a URI: absolute paths and URIs as they are, relative ones under `image_root`
    (normalised, since object-store keys are literal: `./a.tif` is not `a.tif`; one climbing above
    the root is refused)."""
    if uri_protocol(image) is not None or image.startswith("/"):
        return image
    relative = posixpath.normpath(image)
    if relative == ".." or relative.startswith("../"):
        raise SampleError("image", f"{redact(image)!r} climbs above the image root")
    return join_uri(image_root, *relative.split("/"))


def default_image_root(manifest: str) -> str:
    """The manifest's directory (its prefix, for object stores)."""
    if uri_protocol(manifest) is None:
        return os.path.dirname(os.path.abspath(manifest))
    return manifest.rsplit("/", 1)[0]


def question_text(conversations: list[dict[str, Any]], image_token: str) -> str:
    """The text of the human turn that holds the image, without the placeholder (what strategies select with)."""
    for turn in conversations:
        value = str(turn.get("value", ""))
        if image_token in value:
            return value.replace(image_token, "").strip()
    raise SampleError("conversation", f"no turn holds {image_token!r}")


def _parse(record: str) -> Any:
    try:
        return json.loads(record)
    except json.JSONDecodeError as error:
        raise SampleError("json", f"{error.msg} at column {error.colno}") from error


def _check_fields(sample: Any) -> None:
    if not isinstance(sample, dict):
        raise SampleError("json", f"a record must be an object, got {type(sample).__name__}")
    missing = [key for key in ("image", "conversations") if key not in sample]
    if missing:
        raise SampleError("fields", f"missing {', '.join(missing)}")
    _image_paths(sample)
    if not isinstance(sample["conversations"], list) or not sample["conversations"]:
        raise SampleError("fields", "'conversations' must be a non-empty list of turns")


def _image_paths(sample: dict[str, Any]) -> list[str]:
    """The record's `image`: one path, or a list of them in placeholder order (a multi-image record)."""
    image = sample["image"]
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(path, str) and path for path in paths):
        raise SampleError("fields", f"'image' must be a non-empty string or a non-empty list of them, got {image!r}")
    return paths


def _window(sample: dict[str, Any]) -> Box | None:
    """The record's `window` as a box, None when it names none (the checks that need no image)."""
    window = sample.get("window")
    if window is None:
        return None
    if (
        not isinstance(window, list)
        or len(window) != 4
        or not all(isinstance(value, int) and not isinstance(value, bool) for value in window)
    ):
        raise SampleError("window", f"must be [col_off, row_off, width, height] in pixels, got {window!r}")
    if window[2] <= 0 or window[3] <= 0 or window[0] < 0 or window[1] < 0:
        raise SampleError("window", f"needs offsets >= 0 and a positive size, got {window!r}")
    return Box(*window)


def _bbox(sample: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """The record's evidence `bbox` (x0, y0, x1, y1, scene pixels), None when it names none."""
    bbox = sample.get("bbox")
    if bbox is None:
        return None
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in bbox)
    ):
        raise SampleError("bbox", f"must be [x0, y0, x1, y1] in pixels, got {bbox!r}")
    x0, y0, x1, y1 = (float(value) for value in bbox)
    if x1 <= x0 or y1 <= y0:
        raise SampleError("bbox", f"needs x1 > x0 and y1 > y0, got {bbox!r}")
    return x0, y0, x1, y1


def bbox_in_window(bbox: tuple[float, float, float, float], window: Box) -> list[float]:
    """`bbox` (scene pixels) in the frame of `window`, clipped to it; a box outside the window is refused."""
    x0, y0 = max(bbox[0] - window.col_off, 0.0), max(bbox[1] - window.row_off, 0.0)
    x1, y1 = min(bbox[2] - window.col_off, float(window.width)), min(bbox[3] - window.row_off, float(window.height))
    if x1 <= x0 or y1 <= y0:
        raise SampleError("bbox", f"{list(bbox)} lies outside the sample's window {[window.col_off, window.row_off, window.width, window.height]}")
    return [x0, y0, x1, y1]


def _key(record: str, sample: Any) -> str:
    """What a skipped record is known by in logs and the summary: its id, else the start of its
    text, credentials masked (a record's image may be a signed URL)."""
    if isinstance(sample, dict) and sample.get("id") is not None:
        return redact(str(sample["id"]))
    if not record:
        return "<manifest>"
    text = record if len(record) <= 80 else record[:77] + "..."
    return redact(f"<record {text}>")


def prepare_sample(
    row: dict[str, Any],
    *,
    tokenizer: PreTrainedTokenizerBase,
    model_config: UhrConfig,
    pruning: PruningConfig,
    image_root: str,
    max_length: int,
    storage: StorageConfig,
    normalize: NormalizeConfig,
    ledger: ray.actor.ActorHandle | None = None,
) -> list[dict[str, Any]]:
    """One manifest record -> [prepared sample], or [] when it cannot be used (reason logged and recorded)."""
    record = row["record"] or ""
    sample: Any = None
    try:
        if row.get("error"):
            raise SampleError("manifest", row["error"])
        sample = _parse(record)
        _check_fields(sample)
        conversations = sample["conversations"]
        question = question_text(conversations, model_config.image_token)
        strategy = build_strategy(pruning)
        if not question and strategy.query_guided:
            raise SampleError("conversation", f"the image turn holds no question for {pruning.strategy.value} to select with")
        uris = [image_uri(path, image_root) for path in _image_paths(sample)]
        try:
            tokens = tokenize_conversation(
                tokenizer, conversations, max_length, image_token=model_config.image_token, images=len(uris)
            )
        except ValueError as error:
            raise SampleError("conversation", str(error)) from error
        window = _window(sample)
        bbox = _bbox(sample)
        images = []
        for k, uri in enumerate(uris):
            which = f"image {k + 1} of {len(uris)}: " if len(uris) > 1 else ""
            images.append(_read_image(uri, window, which, strategy, model_config, storage, normalize))
        first, *extra = images
        evidence = None if bbox is None else bbox_in_window(bbox, Box(*first["window"]))
    except SampleError as error:
        key = _key(record, sample)
        reason = redact(str(error).splitlines()[0])
        logger.warning("skipping sample %s: %s", key, reason)
        if ledger is not None:  # waited for, so the count is complete once the data is consumed
            ray.get(ledger.add.remote(key, hashlib.sha256(record.encode()).hexdigest(), reason))
        return []
    return [
        {
            "id": str(sample.get("id", "")),
            **first,
            "question": question,
            "bbox": evidence,
            "input_ids": tokens["input_ids"].tolist(),
            "labels": tokens["labels"].tolist(),
            "extra_images": extra,
        }
    ]


def _read_image(
    uri: str,
    window: Box | None,
    which: str,
    strategy: PruningStrategy,
    model_config: UhrConfig,
    storage: StorageConfig,
    normalize: NormalizeConfig,
) -> dict[str, Any]:
    """One image's part of a prepared sample: `image`, `window` (the whole image when None), `width`,
    `height` (of the window), and the whole-window views the strategy's `encode` reads."""
    views, shapes = [], []
    try:
        with open_scene(uri, storage=storage, normalize=normalize) as scene:
            window = window or Box(0, 0, scene.width, scene.height)
            source = _window_of(scene, window, which)
            for side in strategy.views(model_config, source.width, source.height):
                view = source.read_view(side)
                views.append(view.tobytes())
                shapes.append(list(view.shape))
    except SampleError:
        raise
    except Exception as error:  # GDAL and the network fail in many ways; each costs one sample
        raise SampleError("image", f"{which}{type(error).__name__}: {error}") from error
    return {
        "image": uri,
        "window": [window.col_off, window.row_off, window.width, window.height],
        "width": window.width,
        "height": window.height,
        "views": views,
        "view_shapes": shapes,
    }


def _window_of(scene: Scene, window: Box, which: str) -> WindowSource:
    try:
        return WindowSource(scene, window)
    except ValueError as error:
        raise SampleError("window", f"{which}{error}") from error


def build_training_dataset(
    manifest: str,
    image_root: str,
    *,
    tokenizer: PreTrainedTokenizerBase,
    model_config: UhrConfig,
    pruning: PruningConfig,
    max_length: int,
    storage: StorageConfig,
    normalize: NormalizeConfig,
    num_cpus: float = 1.0,
    concurrency: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    ledger: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset:
    """The lazy dataset of prepared samples: read the manifest, prepare each record on CPUs."""
    return read_manifest(manifest, storage).flat_map(
        prepare_sample,
        fn_kwargs={
            "tokenizer": tokenizer,
            "model_config": model_config,
            "pruning": pruning,
            "image_root": image_root,
            "max_length": max_length,
            "storage": storage,
            "normalize": normalize,
            "ledger": ledger,
        },
        num_cpus=num_cpus,
        concurrency=concurrency,
        runtime_env=runtime_env,
    )


def count_records(manifest: str, storage: StorageConfig) -> int:
    """Records in the manifest (before preparation): sizes the learning-rate schedule."""
    return read_manifest(manifest, storage).count()


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------


class PreparedSource:
    """The `PixelSource` a training worker hands a strategy for one prepared sample.

    Whole-scene views come from the sample (read by the CPU stage); anything else (c2f's fine
    windows) is read from the scene itself, opened on first need, within the sample's `window`.
    Use as a context manager.
    """

    def __init__(self, sample: dict[str, Any], storage: StorageConfig, normalize: NormalizeConfig):
        self.uri = sample["image"]
        self._window = Box(*(int(value) for value in sample["window"]))
        self._views = decode_views(sample)
        self._storage, self._normalize = storage, normalize
        self._scene: Scene | None = None
        self._source: WindowSource | None = None

    @property
    def width(self) -> int:
        return self._window.width

    @property
    def height(self) -> int:
        return self._window.height

    def _open(self) -> WindowSource:
        if self._source is None:
            self._scene = open_scene(self.uri, storage=self._storage, normalize=self._normalize)
            self._source = WindowSource(self._scene, self._window)
        return self._source

    def read_view(self, max_side: int) -> np.ndarray:
        if max_side in self._views:
            return self._views[max_side]
        return self._open().read_view(max_side)

    def read_window(
        self, col_off: int, row_off: int, width: int, height: int, out_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        return self._open().read_window(col_off, row_off, width, height, out_size=out_size)

    def close(self) -> None:
        if self._scene is not None:
            self._scene.close()
            self._scene, self._source = None, None

    def __enter__(self) -> PreparedSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def collate(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask`, each (B, L)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, sample in enumerate(samples):
        count = len(sample["input_ids"])
        input_ids[i, :count] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[i, :count] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[i, :count] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


__all__ = [
    "PreparedSource",
    "SampleError",
    "SkipLedger",
    "arrow_filesystem",
    "build_training_dataset",
    "collate",
    "count_records",
    "default_image_root",
    "image_uri",
    "load_tokenizer",
    "prepare_sample",
    "question_text",
    "read_manifest",
]
