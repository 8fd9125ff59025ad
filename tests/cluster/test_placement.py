"""Ray's autoscaler puts each job's demands on the worker types meant for them.

The packing is Ray's own (`resource_demand_scheduler.get_nodes_for`, what the cluster launcher's
autoscaler runs each update) over the node types of cluster/aws-gpu.yaml; the demands are what the
cluster configs make the jobs ask for.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

from uhr.config import load_config
from uhr.pipeline.config import VqaConfig
from uhr.train.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]


def nodes_launched(launcher: dict[str, Any], demands: list[dict[str, float]]) -> dict[str, int]:
    """Worker nodes the autoscaler launches, by type, for `demands` on an empty cluster; a demand
    nothing can hold fails the test."""
    head = launcher["head_node_type"]
    node_types = {name: spec for name, spec in launcher["available_node_types"].items() if name != head}
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    launched, infeasible = get_nodes_for(
        node_types, {}, head, launcher["max_workers"], demands, utilization_scorer=scorer
    )
    assert not infeasible, f"no node type holds {infeasible}"
    return dict(launched)


@pytest.mark.parametrize(
    "actors",
    [
        1,
        2,
        4,
        # Without an accelerator type, 8 demands at once would pack onto one gpu-h100 node: Ray
        # scores utilisation, not price.
        8,
    ],
)
def test_vqa_actors_get_a10g_workers(launcher: dict[str, Any], actors: int) -> None:
    encode = load_config(VqaConfig, REPO / "configs" / "vqa" / "cluster.yaml").encode
    assert actors <= encode.max_actors and encode.accelerator_type == "A10G"
    # What Ray asks for when a pool names an accelerator type (a 0.001 share of its resource).
    demand = {"GPU": encode.num_gpus, "CPU": encode.num_cpus, f"accelerator_type:{encode.accelerator_type}": 0.001}
    assert nodes_launched(launcher, [demand] * actors) == {"gpu-a10g": actors}


def test_training_workers_get_one_h100_worker(launcher: dict[str, Any]) -> None:
    scaling = load_config(FinetuneConfig, REPO / "configs" / "train" / "cluster.yaml").scaling
    demand = {"GPU": 1, "CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    assert nodes_launched(launcher, [demand] * scaling.num_workers) == {"gpu-h100": 1}


def test_read_tasks_get_cpu_workers(launcher: dict[str, Any]) -> None:
    # CPUs only: the tasks' memory reservation fits the `memory` that `ray up` reads from the
    # instance type on AWS, which the YAML does not declare.
    read = load_config(VqaConfig, REPO / "configs" / "vqa" / "cluster.yaml").read
    launched = nodes_launched(launcher, [{"CPU": read.num_cpus}] * 48)
    assert launched == {"cpu-reader": 3}
