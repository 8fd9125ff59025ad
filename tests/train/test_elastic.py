"""Elastic fine-tuning on a simulated cluster that grows and shrinks: a run of 1-2 workers starts on
the one node that has room; when a second node joins, Ray Train restarts the group at two workers
from the latest checkpoint, which one worker wrote (rank 0 converts it to DeepSpeed's universal form
and both ranks load it); when that node is lost, the group restarts at one worker from a checkpoint
two wrote, converted the same way (ZeRO-2 over gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from uhr.testing.waiting import wait_for
from uhr.train import FinetuneConfig
from uhr.train.resume import RESUME_FILE
from uhr.train.universal import UNIVERSAL_DONE, UNIVERSAL_TAG

from .conftest import SNAPSHOT, BackgroundRun

SLOT = "elastic_slot"
MAX_STEPS = 16


def _written_by(checkpoint: Path) -> int:
    return json.loads((checkpoint / RESUME_FILE).read_text())["scaling.num_workers"]


def _registered(run: Path) -> list[int]:
    """Group sizes that wrote the checkpoints Ray Train has registered (once every rank reported;
    a group lost before that rightly restarts from the one before)."""
    snapshot = run / SNAPSHOT
    text = snapshot.read_text() if snapshot.exists() else ""
    return [_written_by(path) for path in sorted(run.glob("checkpoint-*")) if path.name in text and (path / RESUME_FILE).exists()]


@pytest.mark.slow  # three worker-group starts (~3 min here)
def test_a_group_grows_when_a_node_joins_and_shrinks_when_it_is_lost(model_dir, train_archive, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=2, resources={SLOT: 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        config = FinetuneConfig.model_validate(
            {
                "model": str(model_dir),
                "data": {"manifest": train_archive.train_jsonl, "max_length": 512, "shuffle_buffer": 0},
                "pruning": {"strategy": "downsample", "budget": 64},
                "scaling": {"num_workers": 2, "min_workers": 1, "resize_interval_s": 2, "resources_per_worker": {SLOT: 1}},
                "batch_size": 2,
                "max_steps": MAX_STEPS,
                "checkpoint_every_steps": 2,
                "keep_checkpoints": MAX_STEPS,  # the one the group grew from stays, to be looked at
                "output": str(tmp_path / "runs"),
            }
        )
        training = BackgroundRun(config)
        run = tmp_path / "runs" / "finetune"
        wait_for(lambda: any(run.glob(f"checkpoint-*/{RESUME_FILE}")) or not training.is_alive(), 300, "a checkpoint of one worker")
        joined = cluster.add_node(num_cpus=2, resources={SLOT: 1})
        wait_for(lambda: 2 in _registered(run) or not training.is_alive(), 300, "a registered checkpoint of two workers")
        cluster.remove_node(joined)
        summary = training.summary()
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert summary.steps == MAX_STEPS and [step for step, _ in summary.history] == list(range(1, MAX_STEPS + 1))
    assert len(summary.nodes) == 1  # the group ended on the node that stayed
    # Each restart went on from the latest checkpoint, converted when another group size wrote it:
    # the growth from one worker's, the loss of the node from two workers'.
    converted = sorted(path.parents[1] for path in run.glob(f"checkpoint-*/{UNIVERSAL_TAG}/{UNIVERSAL_DONE}"))
    assert [_written_by(path) for path in converted] == [1, 2], summary.resumed_from
    assert {f"checkpoint-{step:08d}" for step in summary.resumed_from} >= {path.name for path in converted}
