"""A small synthetic training split and manifests with bad rows, for the training tests."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from uhr.synth import ArchiveIndex, write_archive
from uhr.train import FinetuneConfig, FinetuneSummary, run_finetune

SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Where Ray Train keeps its checkpoint manager's state in a run's storage (ray.train.v2._internal.constants)."""


class BackgroundRun:
    """`run_finetune(config)` in a thread, so a test can act on the cluster while it trains."""

    def __init__(self, config: FinetuneConfig):
        self._outcome: dict[str, object] = {}
        self._thread = threading.Thread(target=self._run, args=(config,))
        self._thread.start()

    def _run(self, config: FinetuneConfig) -> None:
        try:
            self._outcome["summary"] = run_finetune(config)
        except BaseException as error:  # raised again in the test's thread, by `summary`
            self._outcome["error"] = error

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def summary(self, timeout: float = 600) -> FinetuneSummary:
        """The run's summary once it ends; its error, raised here, if it failed."""
        self._thread.join(timeout=timeout)
        if "error" in self._outcome:
            raise self._outcome["error"]  # type: ignore[misc]
        return self._outcome["summary"]  # type: ignore[return-value]


@pytest.fixture(scope="package")
def train_archive(tmp_path_factory: pytest.TempPathFactory) -> ArchiveIndex:
    """Three 256-px synthetic training scenes with 4 conversations each (train.jsonl)."""
    root = tmp_path_factory.mktemp("train-archive")
    return write_archive(str(root), scenes=3, size=256, seed=3, split="train", questions_per_scene=4)


SIGNATURE = "uhr-not-a-real-signature"
"""The signature of a signed image URL among the bad records."""


def bad_records(good: dict) -> list[tuple[str, str]]:
    """(JSONL line, the kind of skip it must cause) for every way a manifest row can be unusable."""
    turns = good["conversations"]
    return [
        ('{"id": "broken", "image": ', "json"),
        ("[1, 2, 3]", "json"),
        (json.dumps({"id": "no-image", "conversations": turns}), "fields"),
        (json.dumps({"id": "no-turns", "image": good["image"]}), "fields"),
        (json.dumps({"id": "empty-turns", "image": good["image"], "conversations": []}), "fields"),
        (json.dumps({**good, "id": "missing-scene", "image": "scenes/does_not_exist.tif"}), "image"),
        (json.dumps({**good, "id": "not-a-raster", "image": "train.jsonl"}), "image"),
        (
            json.dumps({**good, "id": "no-placeholder", "conversations": [{"from": "human", "value": "What is here?"}, turns[1]]}),
            "conversation",
        ),
        (json.dumps({**good, "id": "no-answer", "conversations": turns[:1]}), "conversation"),
        (json.dumps({**good, "id": "bad-speaker", "conversations": [turns[0], {"from": "robot", "value": "x"}]}), "conversation"),
        (json.dumps({**good, "id": "window-not-a-box", "window": [0, 0, 64]}), "window"),
        (json.dumps({**good, "id": "window-of-no-size", "window": [0, 0, 0, 64]}), "window"),
        (json.dumps({**good, "id": "window-past-the-image", "window": [0, 0, 100_000, 64]}), "window"),
        (json.dumps({**good, "id": "bbox-not-a-box", "bbox": [1, 2, 3]}), "bbox"),
        (json.dumps({**good, "id": "bbox-upside-down", "bbox": [10, 10, 5, 20]}), "bbox"),
        (json.dumps({**good, "id": "bbox-outside-the-window", "window": [0, 0, 64, 64], "bbox": [100, 100, 120, 120]}), "bbox"),
        # The image alone, no question: nothing for a query-guided strategy (the tests' uhr-bat) to select with.
        (json.dumps({**good, "id": "image-only", "conversations": [{"from": "human", "value": "<image>"}, turns[1]]}), "conversation"),
        (json.dumps({**good, "id": "image-climbs-out", "image": "../elsewhere/scene.tif"}), "image"),
        # Two records sharing an id (one per conversation about an image), each with its own defect: counted apart.
        (json.dumps({**good, "id": "shared-id", "window": [0, 0, 1]}), "window"),
        (json.dumps({**good, "id": "shared-id", "bbox": [4, 4, 2, 2]}), "bbox"),
        # No id, so the record's text names it in logs: its signed URL's signature must not show.
        (json.dumps({"image": f"http://127.0.0.1:1/x.tif?X-Amz-Signature={SIGNATURE}", "conversations": turns}), "image"),
    ]


@pytest.fixture(scope="package")
def manifest_with_bad_rows(train_archive: ArchiveIndex) -> tuple[Path, int, dict[str, int]]:
    """(train.jsonl of the archive plus unusable rows, good rows, expected skip count per kind)."""
    good = [json.loads(line) for line in Path(train_archive.train_jsonl).read_text().splitlines()]
    bad = bad_records(good[0])
    path = Path(train_archive.root) / "train_with_bad_rows.jsonl"
    lines = [json.dumps(row) for row in good]
    for i, (line, _) in enumerate(bad):  # spread over the file, not all in one block
        lines.insert(1 + 2 * i, line)
    path.write_text("\n".join(lines) + "\n")
    kinds: dict[str, int] = {}
    for _, kind in bad:
        kinds[kind] = kinds.get(kind, 0) + 1
    return path, len(good), kinds
