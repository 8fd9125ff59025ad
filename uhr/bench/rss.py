"""Peak resident memory of a local Ray's worker processes, sampled from a thread of the driver.

A local `ray.init()` starts the raylet as a child of the driver, and every worker (task workers,
Ray Data's actors) as a child of the raylet. `WorkerMemorySampler` polls those workers with psutil
every `interval_s`, reading each one's RSS and its high-water mark (`VmHWM` in /proc, which also
catches peaks between two samples), and keeps per-process peaks and the peak of their sum. Ray's
own agents (dashboard, runtime-env) are not workers and are left out. RSS counts the shared pages a
worker touched, object-store pages included, so it is an upper bound on what the worker owns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil

IDLE_TITLE = "ray::IDLE"


@dataclass
class WorkerPeak:
    """One worker process's peak, and the task names it ran (its process titles)."""

    pid: int
    peak_rss: int = 0
    titles: set[str] = field(default_factory=set)

    @property
    def role(self) -> str:
        """What the worker did: the tasks and actors it ran (method names dropped), or idle."""
        # An actor's title is "ray::Class(...)" between calls and "ray::Class(...).method" during one.
        busy = {t[: t.rindex(").") + 1] if ")." in t else t for t in self.titles if t != IDLE_TITLE}
        return ", ".join(sorted(busy)) if busy else IDLE_TITLE


def high_water_mark(pid: int) -> int | None:
    """VmHWM of `pid` in bytes (Linux), None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def find_raylet(driver: psutil.Process | None = None) -> psutil.Process:
    """The raylet a local `ray.init()` in this process started."""
    driver = driver or psutil.Process()
    for child in driver.children(recursive=True):
        try:
            if child.name() == "raylet":
                return child
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError("no raylet among this process's children: call ray.init() (a local cluster) first")


class WorkerMemorySampler:
    """`with WorkerMemorySampler() as sampler: ...` then `sampler.workers` and `sampler.peak_total`."""

    def __init__(self, interval_s: float = 0.1):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.workers: dict[int, WorkerPeak] = {}
        self.peak_total = 0
        self._raylet = find_raylet()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uhr-rss-sampler", daemon=True)

    def __enter__(self) -> WorkerMemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Read every worker's RSS and high-water mark once."""
        total = 0
        for process in self._raylet.children(recursive=True):
            try:
                # The title Ray sets (task or actor name) is the command line; `name()` may be cut at 15 characters.
                title = (process.cmdline() or [process.name()])[0]
                if not title.startswith("ray::") or title.endswith("Agent"):
                    continue
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            total += rss
            peak = self.workers.setdefault(process.pid, WorkerPeak(process.pid))
            peak.peak_rss = max(peak.peak_rss, rss, high_water_mark(process.pid) or 0)
            peak.titles.add(title)
        self.peak_total = max(self.peak_total, total)

    @property
    def peak_worker(self) -> WorkerPeak | None:
        """The worker with the highest peak."""
        return max(self.workers.values(), key=lambda w: w.peak_rss, default=None)


__all__ = ["WorkerMemorySampler", "WorkerPeak", "find_raylet", "high_water_mark"]
