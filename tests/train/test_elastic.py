"""Elastic fine-tuning on a simulated cluster that grows: a run of 1-2 workers starts on the one node
that has room, and when a second node joins, Ray Train restarts the group at two workers from the
latest checkpoint, which one worker wrote: rank 0 converts it to DeepSpeed's universal form and both
ranks load it (ZeRO-2 over gloo)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from uhr.testing.waiting import wait_for
from uhr.train import FinetuneConfig, run_finetune
from uhr.train.universal import UNIVERSAL_DONE, UNIVERSAL_TAG

SLOT = "elastic_slot"
MAX_STEPS = 10


@pytest.mark.slow  # two worker-group starts and a resize (~3 min here)
def test_a_group_grows_when_a_node_joins_and_goes_on_from_the_smaller_groups_checkpoint(model_dir, train_archive, tmp_path):
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
        result: dict[str, Any] = {}

        def train() -> None:
            try:
                result["summary"] = run_finetune(config)
            except BaseException as error:  # surfaced below, in the test's thread
                result["error"] = error

        thread = threading.Thread(target=train)
        thread.start()
        run = tmp_path / "runs" / "finetune"
        wait_for(lambda: any(run.glob("checkpoint-*/uhr_resume.json")) or not thread.is_alive(), 300, "a checkpoint of the one-worker group")
        cluster.add_node(num_cpus=2, resources={SLOT: 1})
        thread.join(timeout=600)
        if "error" in result:
            raise result["error"]
    finally:
        ray.shutdown()
        cluster.shutdown()

    summary = result["summary"]
    assert summary.steps == MAX_STEPS and [step for step, _ in summary.history] == list(range(1, MAX_STEPS + 1))
    assert summary.resumed_from and len(summary.nodes) == 2 == len(set(summary.nodes))  # the group grew to both nodes
    converted = [path.parents[1] for path in Path(run).glob(f"checkpoint-*/{UNIVERSAL_TAG}/{UNIVERSAL_DONE}")]
    assert [path.name for path in converted] == [f"checkpoint-{summary.resumed_from[-1]:08d}"]
