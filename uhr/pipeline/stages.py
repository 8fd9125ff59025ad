"""The VQA job's stages: read a scene's coarse views on CPU, then encode, prune and answer on an accelerator.

Rows flowing between stages:

* plan row (one per scene): `scene`, `questions` (list of {question_id, question, choices, bbox,
  prompt});
* read row: the plan row plus `width`, `height`, `views` (raw RGB bytes of the whole-scene views
  the strategy will ask for, with `view_shapes`), `footprint` (WKB), `bytes_read`, `read_ms`,
  `error`;
* token row (split mode, one per question): question fields, the pruned tokens (`embeds` bytes and
  provenance) and the costs so far;
* answer row (one per question): `OUTPUT_SCHEMA` of `uhr.pipeline.output`.

Scene-level costs (the coarse read, the query-independent encode) are shared by a scene's
questions: each row carries its equal share plus what its own question cost (the fine windows it
read, its selection, its answer), so summing a column over rows gives the run's total.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
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


def read_scene(
    row: dict[str, Any],
    *,
    model_config: UhrConfig,
    pruning: PruningConfig,
    storage: StorageConfig,
    normalize: NormalizeConfig,
) -> dict[str, Any]:
    """Open a scene and read the whole-scene views its strategy will ask for; never raises.

    A scene that cannot be read comes out with `error` set; its questions become error rows later.
    """
    uri = row["scene"]
    out: dict[str, Any] = {
        "scene": uri,
        "questions": row["questions"],
        "width": 0,
        "height": 0,
        "views": [],
        "view_shapes": [],
        "footprint": None,
        "stretch": None,
        "bytes_read": 0,
        "read_ms": 0.0,
        "error": None,
    }
    start = time.perf_counter()
    meter = ReadMeter(uri)
    try:
        with meter, open_scene(uri, storage=storage, normalize=normalize) as scene:
            out["width"], out["height"] = scene.width, scene.height
            out["footprint"] = scene.footprint.wkb if scene.footprint is not None else None
            if scene.stretch is not None:  # handed to the window reads, which then compute none
                out["stretch"] = [list(scene.stretch.low), list(scene.stretch.high)]
            for side in build_strategy(pruning).views(model_config, scene.width, scene.height):
                view = scene.read_view(side)
                out["views"].append(view.tobytes())
                out["view_shapes"].append(list(view.shape))
    except Exception as error:  # one bad scene must not fail the job: it becomes error rows
        out["views"], out["view_shapes"] = [], []
        out["error"] = _error_text(uri, error)
    out["bytes_read"] = meter.bytes
    out["read_ms"] = (time.perf_counter() - start) * 1000
    return out


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

    def _answer(self, tokens: list[PrunedTokens], prompts: list[str]) -> tuple[list[str], float]:
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
        source = StagedSource(scene, self.config)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                encoding = self.strategy.encode(self.model, source)
        except Exception as error:
            _log_failure(f"encoding {scene['scene']}", error)
            for row in rows:
                row["error"] = _error_text(scene["scene"], error, "encoding: ")
            return rows
        extra_bytes, extra_read_ms = source.take_reads()
        scene_encode_ms = (time.perf_counter() - start) * 1000 - extra_read_ms
        scene_bytes = _add(scene["bytes_read"], extra_bytes)
        scene_read_ms = scene["read_ms"] + extra_read_ms

        selected: list[tuple[dict[str, Any], PrunedTokens, str]] = []
        for row, question in zip(rows, questions):
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    tokens = self.strategy.select(self.model, encoding, question_prompt(question))
            except Exception as error:
                _log_failure(f"selecting tokens for question {question['question_id']} of {scene['scene']}", error)
                row["error"] = f"question {question['question_id']}: " + _error_text(scene["scene"], error, "selecting tokens: ")
                # What its failed reads cost is this question's, not the next one's.
                own_bytes, own_read_ms = source.take_reads()
                row.update(
                    bytes_read=_add(None if scene_bytes is None else round(scene_bytes / count), own_bytes),
                    read_ms=scene_read_ms / count + own_read_ms,
                )
                continue
            own_bytes, own_read_ms = source.take_reads()
            per_scale = tokens.per_scale()
            row.update(
                tokens_dense=tokens.dense,
                tokens_kept=len(tokens),
                tokens_per_scale=[per_scale.get(s, 0) for s in range(max(per_scale, default=-1) + 1)],
                bytes_read=_add(None if scene_bytes is None else round(scene_bytes / count), own_bytes),
                read_ms=scene_read_ms / count + own_read_ms,
                encode_ms=scene_encode_ms / count + (time.perf_counter() - start) * 1000 - own_read_ms,
                **evidence_seen(tokens, row["bbox"]),
            )
            selected.append((row, tokens, question_prompt(question)))
        if not self.fused:
            return [{**row, **token_payload(tokens, prompt)} for row, tokens, prompt in selected] + [
                {**row, **token_payload(None, None)} for row in rows if row["error"]
            ]
        self._answer_rows(selected)
        return rows

    def _answer_rows(self, selected: list[tuple[dict[str, Any], PrunedTokens, str]]) -> None:
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
    """Answer columns plus the pruned tokens of the question, for the split answer stage."""
    return OUTPUT_SCHEMA.append(pa.field("prompt", pa.string())).append(pa.field("embeds", pa.large_binary())).append(
        pa.field("embeds_shape", pa.list_(pa.int64()))
    ).append(pa.field("provenance", pa.large_binary())).append(pa.field("boxes", pa.large_binary()))


def token_payload(tokens: PrunedTokens | None, prompt: str | None) -> dict[str, Any]:
    """The columns that carry `tokens` (float32 embeddings, int64 provenance, float32 boxes)."""
    if tokens is None:
        return {"prompt": prompt, "embeds": None, "embeds_shape": None, "provenance": None, "boxes": None}
    embeds = tokens.embeds.detach().float().cpu().numpy()
    provenance = torch.stack([getattr(tokens, name) for name in _PROVENANCE]).cpu().numpy().astype(np.int64)
    return {
        "prompt": prompt,
        "embeds": embeds.tobytes(),
        "embeds_shape": list(embeds.shape),
        "provenance": provenance.tobytes(),
        "boxes": tokens.box.float().cpu().numpy().tobytes(),
    }


def tokens_from_payload(row: dict[str, Any]) -> PrunedTokens:
    """Rebuild the `PrunedTokens` that `token_payload` wrote."""
    count, dim = row["embeds_shape"]
    provenance = torch.from_numpy(np.frombuffer(row["provenance"], dtype=np.int64).reshape(len(_PROVENANCE), count).copy())
    return PrunedTokens(
        embeds=torch.from_numpy(np.frombuffer(row["embeds"], dtype=np.float32).reshape(count, dim).copy()),
        **{name: provenance[i] for i, name in enumerate(_PROVENANCE)},
        box=torch.from_numpy(np.frombuffer(row["boxes"], dtype=np.float32).reshape(count, 4).copy()),
        dense=int(row["tokens_dense"]),
    )

