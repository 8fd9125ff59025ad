"""The VQA job's stages: read a scene's coarse views on CPU, then encode, prune and answer on an accelerator.

Rows flowing between stages:

* plan row (one per scene, or per image sequence of multi-image questions): `scene`,
  `extra_scenes` (the further images, usually none), `questions` (list of {question_id, question,
  choices, bbox, prompt});
* read row: the plan row plus `width`, `height`, `views` (raw RGB bytes of the whole-scene views
  the strategy will ask for, with `view_shapes`), `footprint` (WKB), `stretch`, `bytes_read`,
  `read_ms`, `error`, and `extra_images`: the same image fields for each extra scene;
* token row (split mode, one per question): question fields, the pruned tokens of each image
  (`embeds` bytes and provenance) and the costs so far;
* answer row (one per question): `OUTPUT_SCHEMA` of `uhr.pipeline.output`.

A multi-image question's images are each encoded and pruned as a scene of their own (the budget
applies per image, as each image is a model input of its own) and handed to the model together.
Scene-level costs (the coarse read, the query-independent encode) are shared by a scene's
questions: each row carries its equal share plus what its own question cost (the fine windows it
read, its selection, its answer), so summing a column over rows gives the run's total.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from uhr.answers import extract_choice
from uhr.model import load_model
from uhr.model.config import UhrConfig
from uhr.model.pruning import PrunedTokens, build_strategy
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.config import VqaConfig
from uhr.pipeline.reads import StagedSource, task_error_cause
from uhr.pipeline.output import OUTPUT_SCHEMA
from uhr.prompts import xlrs_prompt
from uhr.scenes import open_scene
from uhr.scenes.metering import ReadMeter
from uhr.scenes.normalize import NormalizeConfig
from uhr.storage import StorageConfig, redact

logger = logging.getLogger(__name__)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(uri: str, error: BaseException, step: str = "") -> str:
    """One line naming the scene, the step that failed and why, with credentials masked.

    A Ray task's error is unwrapped to the exception the task raised; a message that already names
    the scene (`SceneError`) is kept as it is.
    """
    error = task_error_cause(error)
    lines = _ANSI.sub("", str(error)).strip().splitlines()
    first = redact(lines[0]) if lines else ""
    if redact(uri) in first:
        return first
    return redact(f"scene {uri}: {step}{type(error).__name__}" + (f": {first}" if first else ""))


def _log_failure(what: str, error: BaseException) -> None:
    """Log a failure with its traceback, credentials masked (a presigned URL may be in the message)."""
    trace = _ANSI.sub("", "".join(traceback.format_exception(error)))
    logger.error("%s failed:\n%s", redact(what), redact(trace))


# ----------------------------------------------------------------------------------------------
# Read stage (CPU tasks)
# ----------------------------------------------------------------------------------------------


def _read_image(
    uri: str, *, model_config: UhrConfig, pruning: PruningConfig, storage: StorageConfig, normalize: NormalizeConfig
) -> tuple[dict[str, Any], int | None, str | None]:
    """One image's read-row fields (`scene`, size, views, footprint, stretch), its bytes read and
    its error (None when it was read)."""
    image: dict[str, Any] = {
        "scene": uri,
        "width": 0,
        "height": 0,
        "views": [],
        "view_shapes": [],
        "footprint": None,
        "stretch": None,
    }
    meter = ReadMeter(uri)
    error = None
    try:
        with meter, open_scene(uri, storage=storage, normalize=normalize) as scene:
            image["width"], image["height"] = scene.width, scene.height
            image["footprint"] = scene.footprint.wkb if scene.footprint is not None else None
            if scene.stretch is not None:  # handed to the window reads, which then compute none
                image["stretch"] = [list(scene.stretch.low), list(scene.stretch.high)]
            for side in build_strategy(pruning).views(model_config, scene.width, scene.height):
                view = scene.read_view(side)
                image["views"].append(view.tobytes())
                image["view_shapes"].append(list(view.shape))
    except Exception as err:  # one bad scene must not fail the job: it becomes error rows
        error = _error_text(uri, err)
    return image, meter.bytes, error


def read_scene(
    row: dict[str, Any],
    *,
    model_config: UhrConfig,
    pruning: PruningConfig,
    storage: StorageConfig,
    normalize: NormalizeConfig,
) -> dict[str, Any]:
    """Open a scene (and a multi-image group's further images) and read the whole-scene views its
    strategy will ask for; never raises.

    The first image's fields are the row's own; further images come in `extra_images`, each with
    the same fields. A group with an image that cannot be read comes out with `error` set (naming
    that image) and no views; its questions become error rows later.
    """
    start = time.perf_counter()
    images: list[dict[str, Any]] = []
    bytes_read: int | None = 0
    error = None
    for uri in [row["scene"], *(row.get("extra_scenes") or [])]:
        image, count, error = _read_image(uri, model_config=model_config, pruning=pruning, storage=storage, normalize=normalize)
        images.append(image)
        bytes_read = _add(bytes_read, count)
        if error:
            break
    if error:  # nothing of the group is encoded: its views would only ride along
        for image in images:
            image["views"], image["view_shapes"] = [], []
    return {
        **images[0],
        "questions": row["questions"],
        "extra_scenes": list(row.get("extra_scenes") or []),
        "extra_images": images[1:] if not error else [],
        "bytes_read": bytes_read,
        "read_ms": (time.perf_counter() - start) * 1000,
        "error": error,
    }


# Explicit because Ray Data infers a row's types per block and cannot join a struct field inferred
# as null in one block (an extra image without a stretch) with the same field typed in another.
EXTRA_IMAGES_TYPE = pa.list_(
    pa.struct(
        [
            pa.field("scene", pa.string()),
            pa.field("width", pa.int64()),
            pa.field("height", pa.int64()),
            pa.field("views", pa.list_(pa.binary())),
            pa.field("view_shapes", pa.list_(pa.list_(pa.int64()))),
            pa.field("footprint", pa.binary()),
            pa.field("stretch", pa.list_(pa.list_(pa.float64()))),
        ]
    )
)


def read_scenes(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """`read_scene` over a batch of plan rows (keyword arguments as there), `extra_images` typed
    `EXTRA_IMAGES_TYPE`: the read stage's Ray Data function."""
    rows = [read_scene(row, **kwargs) for row in batch.to_pylist()]
    extra_images = pa.array([row.pop("extra_images") for row in rows], EXTRA_IMAGES_TYPE)
    return pa.Table.from_pylist(rows).append_column("extra_images", extra_images)


# ----------------------------------------------------------------------------------------------
# Accelerator stages (actors)
# ----------------------------------------------------------------------------------------------


def question_prompt(question: dict[str, Any]) -> str:
    """The text the model sees: the table's own `prompt`, else XLRS's layout when there are choices."""
    if question.get("prompt"):
        return question["prompt"]
    if question.get("choices"):
        return xlrs_prompt(question["question"], list(question["choices"]))
    return question["question"]


def _add(a: int | None, b: int | None) -> int | None:
    """Sum of byte counts; None (not metered) wins."""
    return None if a is None or b is None else a + b


def _take_reads(sources: list[StagedSource]) -> tuple[int | None, float]:
    """(bytes, ms) the sources' CPU-task reads took since the last call, summed over a group's images."""
    bytes_read, ms = 0, 0.0
    for source in sources:
        count, took = source.take_reads()
        bytes_read, ms = _add(bytes_read, count), ms + took
    return bytes_read, ms


def evidence_seen(tokens: PrunedTokens, bbox: list[float] | None) -> dict[str, Any]:
    """How the kept tokens cover a question's evidence `bbox` (scene pixels): the output's evidence columns.

    `evidence_tokens`: kept tokens whose box overlaps it; `evidence_px`: the longest side of the
    finest of them, the resolution at which the LLM saw the evidence (a merged token counts with
    the bounding box of its members). Both null without a bbox; `evidence_px` null when no kept
    token overlaps it.
    """
    if bbox is None:
        return {"evidence_tokens": None, "evidence_px": None}
    overlap = tokens.overlapping(bbox)
    if not bool(overlap.any()):
        return {"evidence_tokens": 0, "evidence_px": None}
    box = tokens.box[overlap]
    sides = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    return {"evidence_tokens": int(overlap.sum()), "evidence_px": float(sides.min())}


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _base_row(scene: dict[str, Any], question: dict[str, Any], config: VqaConfig, model_id: str, run_id: str) -> dict[str, Any]:
    return {
        "question_id": question["question_id"],
        "scene": redact(scene["scene"]),  # a presigned URL's signature stays out of the dataset
        "extra_scenes": [redact(uri) for uri in scene.get("extra_scenes") or []] or None,
        "question": question["question"],
        "choices": question.get("choices"),
        "bbox": question.get("bbox"),
        "answer": None,
        "choice": None,
        "error": None,
        "tokens_dense": None,
        "tokens_kept": None,
        "tokens_per_scale": None,
        "evidence_tokens": None,
        "evidence_px": None,
        "bytes_read": None,
        "read_ms": None,
        "encode_ms": None,
        "answer_ms": None,
        "model": model_id,
        "strategy": config.pruning.strategy.value,
        "budget": config.pruning.budget,
        "run_id": run_id,
        "footprint": scene.get("footprint"),
    }


class _ModelStage:
    """Loads the model once per actor (the expensive part), as Ray's batch-inference examples do."""

    def __init__(self, config: VqaConfig, model_uri: str, run_id: str, num_gpus: float, model_id: str | None = None):
        self.config = config
        # What rows name the model by: its URI, redacted (the driver's redaction when it passes one).
        self.model_id = model_id or redact(model_uri)
        self.run_id = run_id
        self.device = _device(num_gpus)
        self.model, _ = load_model(
            model_uri, storage=config.storage, dtype=config.precision.value, device=self.device
        )
        self.strategy = build_strategy(config.pruning)

    def _answer(self, tokens: list[list[PrunedTokens]], prompts: list[str]) -> tuple[list[str], float]:
        start = time.perf_counter()
        answers = self.model.answer(tokens, prompts, max_new_tokens=self.config.max_new_tokens)
        return answers, (time.perf_counter() - start) * 1000 / len(prompts)

    def _finish(self, row: dict[str, Any], answer: str) -> dict[str, Any]:
        row["answer"] = answer
        row["choice"] = extract_choice(answer) if row["choices"] else None
        return row


class EncodeStage(_ModelStage):
    """Encode + prune each scene once, select per question, and (fused) answer; yields rows per scene."""

    def __init__(self, config: VqaConfig, model_uri: str, run_id: str, fused: bool, model_id: str | None = None):
        super().__init__(config, model_uri, run_id, config.encode.num_gpus, model_id)
        self.fused = fused

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for scene in batch.to_pylist():
            rows = self._scene(scene)
            if rows:
                yield pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA if self.fused else token_schema())

    def _scene(self, scene: dict[str, Any]) -> list[dict[str, Any]]:
        questions = scene["questions"]
        count = len(questions)
        rows = [_base_row(scene, q, self.config, self.model_id, self.run_id) for q in questions]
        if scene["error"]:
            for row in rows:
                row["error"] = scene["error"]
            return rows
        images = [scene, *(scene.get("extra_images") or [])]
        sources = [StagedSource(image, self.config) for image in images]
        start = time.perf_counter()
        encodings = []
        for image, source in zip(images, sources):
            try:
                with torch.inference_mode():
                    encodings.append(self.strategy.encode(self.model, source))
            except Exception as error:
                _log_failure(f"encoding {image['scene']}", error)
                for row in rows:
                    row["error"] = _error_text(image["scene"], error, "encoding: ")
                return rows
        extra_bytes, extra_read_ms = _take_reads(sources)
        scene_encode_ms = (time.perf_counter() - start) * 1000 - extra_read_ms
        scene_bytes = _add(scene["bytes_read"], extra_bytes)
        scene_read_ms = scene["read_ms"] + extra_read_ms

        selected: list[tuple[dict[str, Any], list[PrunedTokens], str]] = []
        for row, question in zip(rows, questions):
            start = time.perf_counter()
            prompt = question_prompt(question)
            tokens: list[PrunedTokens] = []
            try:
                with torch.inference_mode():
                    for encoding in encodings:
                        tokens.append(self.strategy.select(self.model, encoding, prompt))
            except Exception as error:
                failed = images[len(tokens)]["scene"]
                _log_failure(f"selecting tokens for question {question['question_id']} of {failed}", error)
                row["error"] = f"question {question['question_id']}: " + _error_text(failed, error, "selecting tokens: ")
                # What its failed reads cost is this question's, not the next one's.
                own_bytes, own_read_ms = _take_reads(sources)
                row.update(
                    bytes_read=_add(None if scene_bytes is None else round(scene_bytes / count), own_bytes),
                    read_ms=scene_read_ms / count + own_read_ms,
                )
                continue
            own_bytes, own_read_ms = _take_reads(sources)
            per_scale = sum((Counter(image_tokens.per_scale()) for image_tokens in tokens), Counter())
            row.update(
                tokens_dense=sum(t.dense for t in tokens),
                tokens_kept=sum(len(t) for t in tokens),
                tokens_per_scale=[per_scale.get(s, 0) for s in range(max(per_scale, default=-1) + 1)],
                bytes_read=_add(None if scene_bytes is None else round(scene_bytes / count), own_bytes),
                read_ms=scene_read_ms / count + own_read_ms,
                encode_ms=scene_encode_ms / count + (time.perf_counter() - start) * 1000 - own_read_ms,
                **evidence_seen(tokens[0], row["bbox"]),  # the bbox is in the first image's pixels
            )
            selected.append((row, tokens, prompt))
        if not self.fused:
            return [{**row, **token_payload(tokens, prompt)} for row, tokens, prompt in selected] + [
                {**row, **token_payload(None, None)} for row in rows if row["error"]
            ]
        self._answer_rows(selected)
        return rows

    def _answer_rows(self, selected: list[tuple[dict[str, Any], list[PrunedTokens], str]]) -> None:
        size = self.config.answer.batch_size
        for i in range(0, len(selected), size):
            chunk = selected[i : i + size]
            try:
                answers, per_question_ms = self._answer([t for _, t, _ in chunk], [p for _, _, p in chunk])
            except Exception as error:
                _log_failure(f"answering {len(chunk)} question(s) of {chunk[0][0]['scene']}", error)
                for row, _, _ in chunk:
                    row["error"] = _error_text(row["scene"], error, "answering: ")
                continue
            for (row, _, _), answer in zip(chunk, answers):
                self._finish(row, answer)["answer_ms"] = per_question_ms


class AnswerStage(_ModelStage):
    """Answer questions from their pruned tokens (split mode): a batch of token rows -> answer rows."""

    def __init__(self, config: VqaConfig, model_uri: str, run_id: str, model_id: str | None = None):
        super().__init__(config, model_uri, run_id, config.answer.num_gpus, model_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ready = [(row, tokens_from_payload(row)) for row in rows if row["error"] is None]
        if ready:
            try:
                answers, per_question_ms = self._answer([t for _, t in ready], [row["prompt"] for row, _ in ready])
                for (row, _), answer in zip(ready, answers):
                    self._finish(row, answer)["answer_ms"] = per_question_ms
            except Exception as error:
                _log_failure(f"answering {len(ready)} question(s)", error)
                for row, _ in ready:
                    row["error"] = _error_text(row["scene"], error, "answering: ")
        return pa.Table.from_pylist([{name: row[name] for name in OUTPUT_SCHEMA.names} for row in rows], schema=OUTPUT_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Pruned tokens between split stages
# ----------------------------------------------------------------------------------------------

_PROVENANCE = ("scale", "row", "col", "tile", "n_source")


def token_schema() -> pa.Schema:
    """Answer columns plus the pruned tokens of the question, one list entry per image, for the split answer stage."""
    schema = OUTPUT_SCHEMA.append(pa.field("prompt", pa.string()))
    for name in ("embeds", "provenance", "boxes"):
        schema = schema.append(pa.field(name, pa.list_(pa.large_binary())))
    return schema.append(pa.field("embeds_shape", pa.list_(pa.list_(pa.int64())))).append(pa.field("image_dense", pa.list_(pa.int64())))


def token_payload(tokens: list[PrunedTokens] | None, prompt: str | None) -> dict[str, Any]:
    """The columns that carry each image's `tokens` (float32 embeddings, int64 provenance, float32 boxes)."""
    payload: dict[str, Any] = {"prompt": prompt, "embeds": None, "embeds_shape": None, "provenance": None, "boxes": None, "image_dense": None}
    if tokens is None:
        return payload
    payload.update(embeds=[], embeds_shape=[], provenance=[], boxes=[], image_dense=[])
    for image in tokens:
        embeds = image.embeds.detach().float().cpu().numpy()
        payload["embeds"].append(embeds.tobytes())
        payload["embeds_shape"].append(list(embeds.shape))
        provenance = torch.stack([getattr(image, name) for name in _PROVENANCE]).cpu().numpy().astype(np.int64)
        payload["provenance"].append(provenance.tobytes())
        payload["boxes"].append(image.box.float().cpu().numpy().tobytes())
        payload["image_dense"].append(image.dense)
    return payload


def tokens_from_payload(row: dict[str, Any]) -> list[PrunedTokens]:
    """Rebuild each image's `PrunedTokens` that `token_payload` wrote."""
    tokens = []
    for embeds, (count, dim), provenance, boxes, dense in zip(
        row["embeds"], row["embeds_shape"], row["provenance"], row["boxes"], row["image_dense"], strict=True
    ):
        provenance = torch.from_numpy(np.frombuffer(provenance, dtype=np.int64).reshape(len(_PROVENANCE), count).copy())
        tokens.append(
            PrunedTokens(
                embeds=torch.from_numpy(np.frombuffer(embeds, dtype=np.float32).reshape(count, dim).copy()),
                **{name: provenance[i] for i, name in enumerate(_PROVENANCE)},
                box=torch.from_numpy(np.frombuffer(boxes, dtype=np.float32).reshape(count, 4).copy()),
                dense=int(dense),
            )
        )
    return tokens
