"""Ray Data's operator times read from a real `ds.stats()`, and worker memory sampled from a real Ray."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import ray

from uhr.bench.rss import WorkerMemorySampler
from uhr.bench.vqa import parse_operator_stats


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def test_operators_and_worker_peaks_of_a_ray_data_run(local_ray):
    # Defined here so Ray pickles them by value: workers cannot import the test modules.
    def hold_memory(row: dict) -> dict:
        """A task that touches 64 MiB, so its worker's peak shows it."""
        block = np.ones(64 << 20, dtype=np.uint8)
        time.sleep(0.2)
        return {"id": row["id"], "sum": int(block[:: 1 << 20].sum())}

    class Double:
        def __call__(self, batch: dict) -> dict:
            time.sleep(0.1)
            return {"id": batch["id"], "sum": batch["sum"] * 2}

    with WorkerMemorySampler(interval_s=0.05) as sampler:
        ds = (
            ray.data.range(4, override_num_blocks=4)
            .map(hold_memory, num_cpus=1, memory=1)
            .map_batches(Double, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        )
        rows = ds.take_all()
    assert sorted(row["sum"] for row in rows) == [128] * 4
    operators = parse_operator_stats(ds.stats())
    by_name = {op.name: op for op in operators}
    mapped = next(op for name, op in by_name.items() if name.endswith("Map(hold_memory)"))
    actor = by_name["MapBatches(Double)"]
    assert mapped.tasks == 4 and actor.tasks == 4
    # Four tasks of at least 0.2 s each; a span covers at least one task.
    assert mapped.busy_s >= 0.8 and 0.2 <= mapped.span_s <= mapped.busy_s + 1.0
    assert actor.busy_s >= 0.4

    roles = " ".join(worker.role for worker in sampler.workers.values())
    assert "MapWorker(MapBatches(Double))" in roles
    holder = max(sampler.workers.values(), key=lambda w: w.peak_rss)
    assert holder.peak_rss >= 64 << 20 and sampler.peak_total >= holder.peak_rss


def test_a_stats_text_without_operators_is_an_error():
    with pytest.raises(ValueError, match="no operator"):
        parse_operator_stats("Dataset throughput:\n\t* Ray Data throughput: 4 rows/s\n")
