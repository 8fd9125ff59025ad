"""Pixel reads that accelerator actors hand off to CPU tasks.

Kept free of torch and transformers so the worker processes that run these tasks start in about a
second: a fine-window read must not wait for a model library to import.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

from uhr.errors import SceneError
from uhr.pipeline.config import VqaConfig
from uhr.scenes import open_scene
from uhr.scenes.metering import ReadMeter
from uhr.scenes.normalize import NormalizeConfig, Stretch
from uhr.storage import StorageConfig


def task_error_cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised, out of the `RayTaskError` that carries it (whose text is the
    remote traceback, with terminal colour codes); other errors as they are."""
    cause = getattr(error, "cause", None) if isinstance(error, ray.exceptions.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def decode_views(row: dict[str, Any]) -> dict[int, np.ndarray]:
    """The whole-scene views a read stage put in `row` (`views` as raw RGB bytes, `view_shapes`),
    keyed by longest side as `PixelSource.read_view` asks for them."""
    return {
        max(shape[0], shape[1]): np.frombuffer(data, dtype=np.uint8).reshape(shape)
        for data, shape in zip(row["views"], row["view_shapes"])
    }


@ray.remote
def read_windows_task(
    uri: str,
    windows: list[tuple[int, int, int, int]],
    out_size: tuple[int, int] | None,
    storage: StorageConfig,
    normalize: NormalizeConfig,
    stretch: Stretch | None = None,
) -> tuple[list[np.ndarray], int]:
    """Read windows of one scene in a CPU task (one open serves them all); returns (arrays, bytes).

    `stretch` is the one the read stage computed for the scene, so no task reads statistics again.
    """
    with ReadMeter(uri) as meter, open_scene(uri, storage=storage, normalize=normalize, stretch=stretch) as scene:
        arrays = [scene.read_window(*window, out_size=out_size) for window in windows]
    return arrays, meter.bytes


class StagedSource:
    """The `PixelSource` an accelerator actor hands a strategy.

    Whole-scene views come from what the read stage fetched; any other view or window is read by
    CPU tasks (`read_windows_task`), several windows per task, in parallel, so the actor never
    decodes rasters itself. Bytes and time of those reads accumulate until `take_reads()`.
    """

    def __init__(self, row: dict[str, Any], config: VqaConfig):
        self.uri = row["scene"]
        self._width, self._height = int(row["width"]), int(row["height"])
        self._views = decode_views(row)
        stretch = row.get("stretch")
        self._stretch = None if stretch is None else Stretch(low=tuple(stretch[0]), high=tuple(stretch[1]))
        self._config = config
        self._bytes: int | None = 0
        self._ms = 0.0

    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    def read_view(self, max_side: int) -> np.ndarray:
        if max_side in self._views:
            return self._views[max_side]
        scale = max_side / max(self._width, self._height)
        out_size = (max(1, round(self._height * scale)), max(1, round(self._width * scale)))
        return self.read_windows([(0, 0, self._width, self._height)], out_size=out_size)[0]

    def read_window(
        self, col_off: int, row_off: int, width: int, height: int, out_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        return self.read_windows([(col_off, row_off, width, height)], out_size=out_size)[0]

    def read_windows(
        self, windows: list[tuple[int, int, int, int]], out_size: tuple[int, int] | None = None
    ) -> list[np.ndarray]:
        """Read `windows` with CPU tasks, `read.windows_per_task` per task, all at once.

        A failed read raises `SceneError` naming the scene and the reason (the task's own
        `SceneError` when it raised one); its time still counts in `take_reads()`.
        """
        if not windows:
            return []
        read = self._config.read
        start = time.perf_counter()
        per_task = read.windows_per_task
        chunks = [windows[i : i + per_task] for i in range(0, len(windows), per_task)]
        task = read_windows_task.options(num_cpus=read.window_num_cpus)
        config = self._config
        refs = [task.remote(self.uri, chunk, out_size, config.storage, config.normalize, self._stretch) for chunk in chunks]
        results, failure = [], None
        # Every task's outcome is fetched, failed ones too: Ray logs an error nobody fetched, raw
        # traceback and all, which could carry what `redact` would have masked.
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as error:
                failure = failure or error
        self._ms += (time.perf_counter() - start) * 1000
        if failure is not None:
            cause = task_error_cause(failure)
            if isinstance(cause, SceneError):
                raise cause from None
            reason = f"reading {len(windows)} window(s): {type(cause).__name__}: {_first_line(cause)}"
            raise SceneError(self.uri, reason) from None
        counts = [count for _, count in results]
        self._bytes = None if self._bytes is None or None in counts else self._bytes + sum(counts)
        return [array for arrays, _ in results for array in arrays]

    def take_reads(self) -> tuple[int | None, float]:
        """(bytes, ms) read since the last call; bytes are None when not metered (local files)."""
        reads = (self._bytes, self._ms)
        self._bytes, self._ms = 0, 0.0
        return reads
