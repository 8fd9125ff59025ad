"""Read benchmark: what a coarse view and a few fine windows of a UHR scene cost over S3.

For each synthetic scene (written by `uhr.synth.write_scene`, cached on disk), served by a local
S3 API server in its own process: `read_view(672)` and 16 random `read_window(336)` calls, with
their time, the bytes the server sent (measured at the server) and the peak RSS of the reading
process. Each scene is read in a fresh process, as a Ray worker would, so the peak RSS is that
of the reads alone. The same reads from the local file give the decode cost without the network.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from pydantic import BaseModel, ConfigDict, Field

from uhr.cache import default_cache_dir
from uhr.scenes.reader import open_scene
from uhr.scenes.windows import random_boxes

# Targets from the issue: a coarse view fetches at most this fraction of the object ...
VIEW_BYTES_TARGET = 0.05
# ... and a process reading the largest scene's view and windows peaks below this.
PEAK_RSS_TARGET = 1 << 30


class ReadBenchConfig(BaseModel):
    """What `python -m jobs.bench_read` measures."""

    model_config = ConfigDict(extra="forbid")

    sizes: tuple[int, ...] = Field(default=(8192, 32768), description="Sides of the square synthetic scenes.")
    seed: int = Field(default=0, description="Seed of the synthetic scenes and of the window positions.")
    compress: str = Field(default="jpeg", description="COG compression of the scenes: 'jpeg' or 'deflate'.")
    view_side: int = Field(default=672, gt=0, description="Longest side of the coarse view.")
    windows: int = Field(default=16, ge=0, description="Random windows read per scene.")
    window_side: int = Field(default=336, gt=0, description="Side of each window.")
    cache_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / "bench", description="Where generated scenes are kept between runs."
    )
    local: bool = Field(default=True, description="Also read each scene from the local file.")


@dataclass(frozen=True)
class ReadResult:
    """The cost of one scene's reads from one source ("s3" or "local").

    Byte and request counts are measured at the S3 server (None for local reads); `view_bytes`
    includes the header fetched at open, so it is what a coarse view costs a fresh worker.
    """

    size: int
    source: str
    object_bytes: int
    open_s: float
    view_s: float
    view_bytes: int | None
    view_requests: int | None
    windows_s: float
    windows_bytes: int | None
    windows_requests: int | None
    baseline_rss: int
    peak_rss: int


def scene_path(config: ReadBenchConfig, size: int) -> Path:
    """The cached scene of `size` px, generated with `uhr.synth.write_scene` on first use."""
    from uhr.synth import write_scene

    directory = config.cache_dir.expanduser()
    path = directory / f"synth_{size}_seed{config.seed}_{config.compress}.tif"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_scene(str(path), size, config.seed, compress=config.compress)
    return path


def run_read_benchmark(config: ReadBenchConfig) -> list[ReadResult]:
    """Generate (or reuse) the scenes, serve them from a local S3 server, measure the reads."""
    from uhr.testing.s3_server import LocalS3Server

    paths = {size: scene_path(config, size) for size in config.sizes}
    results: list[ReadResult] = []
    with LocalS3Server() as server:
        bucket = server.new_bucket("bench")
        for size, path in paths.items():
            server.client.upload_file(str(path), bucket, path.name)
            sources = [("s3", f"s3://{bucket}/{path.name}")] + ([("local", str(path))] if config.local else [])
            for source, uri in sources:
                endpoint = server.endpoint_url if source == "s3" else None
                measured = _in_fresh_process(uri, endpoint, server.client_env(), config)
                results.append(ReadResult(size=size, source=source, object_bytes=path.stat().st_size, **measured))
    return results


def _in_fresh_process(uri: str, endpoint: str | None, env: dict[str, str], config: ReadBenchConfig) -> dict:
    # spawn, not fork: the child starts without this process's memory, like a Ray worker.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_reads, uri, endpoint, env, config).result()


def _measure_reads(uri: str, endpoint: str | None, env: dict[str, str], config: ReadBenchConfig) -> dict:
    """Runs in the child: open, coarse view, random windows; times, server bytes, peak RSS."""
    from uhr.testing.s3_server import ServerStats, read_stats

    os.environ.update(env)

    def stats() -> ServerStats:
        return read_stats(endpoint) if endpoint is not None else ServerStats()

    # RSS now, after the imports; the peak at the end is the high-water mark of the whole process.
    baseline_rss = psutil.Process().memory_info().rss
    before = stats()
    start = time.perf_counter()
    with open_scene(uri) as scene:
        opened = time.perf_counter()
        scene.read_view(config.view_side)
        viewed = time.perf_counter()
        after_view = stats()
        rng = np.random.default_rng(config.seed)
        for box in random_boxes(scene.width, scene.height, config.window_side, config.windows, rng):
            scene.read_window(box.col_off, box.row_off, box.width, box.height)
        done = time.perf_counter()
        after_windows = stats()
    view, windows = after_view - before, after_windows - after_view
    remote = endpoint is not None
    return {
        "open_s": opened - start,
        "view_s": viewed - opened,
        "view_bytes": view.bytes_sent if remote else None,
        "view_requests": view.requests if remote else None,
        "windows_s": done - viewed,
        "windows_bytes": windows.bytes_sent if remote else None,
        "windows_requests": windows.requests if remote else None,
        "baseline_rss": baseline_rss,
        "peak_rss": peak_rss(),
    }


def peak_rss() -> int:
    """This process's peak resident set size, bytes.

    From /proc's VmHWM where there is one: `ru_maxrss` survives exec on Linux, so a child started
    by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def format_table(results: list[ReadResult], config: ReadBenchConfig) -> str:
    """A Markdown table of the results, then how they compare with the targets."""
    mib = 1 << 20
    header = (
        f"| scene | source | object MiB | open s | read_view({config.view_side}) s | view MiB incl. open (requests) | "
        f"view / object | {config.windows} x read_window({config.window_side}) s | windows MiB (requests) | "
        "peak RSS MiB (before reads) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        remote = r.view_bytes is not None
        lines.append(
            f"| {r.size}^2 | {r.source} | {r.object_bytes / mib:.1f} | {r.open_s:.3f} | {r.view_s:.3f} | "
            + (
                f"{r.view_bytes / mib:.2f} ({r.view_requests}) | {r.view_bytes / r.object_bytes:.2%} | "
                if remote
                else "- | - | "
            )
            + f"{r.windows_s:.3f} | "
            + (f"{r.windows_bytes / mib:.2f} ({r.windows_requests}) | " if remote else "- | ")
            + f"{r.peak_rss / mib:.0f} ({r.baseline_rss / mib:.0f}) |"
        )
    remote_results = [r for r in results if r.view_bytes is not None]
    worst_view = max((r.view_bytes / r.object_bytes for r in remote_results), default=0.0)
    largest = max(config.sizes)
    worst_rss = max((r.peak_rss for r in results if r.size == largest), default=0)
    lines.append("")
    lines.append(
        f"view bytes / object: worst {worst_view:.2%} (target <= {VIEW_BYTES_TARGET:.0%}): "
        + ("met" if worst_view <= VIEW_BYTES_TARGET else "MISSED")
    )
    lines.append(
        f"peak RSS reading the {largest}^2 scene: {worst_rss / mib:.0f} MiB "
        f"(target <= {PEAK_RSS_TARGET / mib:.0f} MiB): "
        + ("met" if worst_rss <= PEAK_RSS_TARGET else "MISSED")
    )
    return "\n".join(lines)
