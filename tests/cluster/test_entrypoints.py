"""Every job a cluster file starts exists, and its config parses into the job's typed config."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from uhr.config import load_config
from uhr.pipeline.config import VqaConfig
from uhr.train.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]

# The typed config each job entry point reads (`python -m <module> --config <yaml> key=value ...`).
JOB_CONFIGS = {"jobs.vqa": "uhr.pipeline.config:VqaConfig", "jobs.finetune": "uhr.train.config:FinetuneConfig"}


def _config_class(module: str) -> type:
    path, _, name = JOB_CONFIGS[module].partition(":")
    return getattr(importlib.import_module(path), name)


def parse_entrypoint(entrypoint: str) -> tuple[str, Path, list[str]]:
    """`python -m jobs.vqa --config configs/x.yaml a=b` -> ("jobs.vqa", REPO/configs/x.yaml, ["a=b"])."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"] and words[3] == "--config", entrypoint
    return words[2], REPO / words[4], words[5:]


@pytest.mark.parametrize("manifest", sorted((REPO / "cluster" / "kuberay").glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_entrypoint_exists_and_its_config_parses(manifest: Path) -> None:
    module, config, overrides = parse_entrypoint(yaml.safe_load(manifest.read_text())["spec"]["entrypoint"])
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"no module {module}"
    assert config.is_file(), f"no config {config}"
    load_config(_config_class(module), config, overrides)


def test_vqa_cluster_config_fits_the_cluster(launcher: dict[str, Any]) -> None:
    config = load_config(VqaConfig, REPO / "configs" / "vqa" / "cluster.yaml")
    node_types = launcher["available_node_types"].values()
    gpu_types = [spec for spec in node_types if spec["resources"].get("GPU")]
    encode = config.encode
    assert encode.num_gpus >= 1 and config.fused, "one whole GPU per fused actor (see the sizing table)"
    # Each GPU of every GPU type can host an actor: enough CPUs beside each GPU.
    for spec in gpu_types:
        resources = spec["resources"]
        assert encode.num_cpus * resources["GPU"] / encode.num_gpus <= resources["CPU"], resources
    assert encode.max_actors * encode.num_gpus <= sum(spec["max_workers"] * spec["resources"]["GPU"] for spec in gpu_types)
    assert encode.min_actors == 1, "a pool cannot shrink to zero: keep the GPUs held to the end to one"
    assert config.precision.value == "bfloat16"
    assert config.storage.region == launcher["provider"]["region"]
    readers = [spec["resources"]["CPU"] for spec in node_types if "GPU" not in spec["resources"]]
    assert config.read.num_cpus <= max(readers) and config.read.concurrency is not None
    for uri in (config.model, config.scenes, config.questions, config.output):
        assert uri.startswith("s3://YOUR-BUCKET/"), uri


def test_finetune_cluster_config_fits_the_cluster(launcher: dict[str, Any]) -> None:
    config = load_config(FinetuneConfig, REPO / "configs" / "train" / "cluster.yaml")
    scaling = config.scaling
    assert scaling.use_gpu and config.precision.value == "bfloat16"
    # The workers' custom resources exist only on GPU types that can hold all of them.
    hosts = [
        spec
        for spec in launcher["available_node_types"].values()
        if all(spec["resources"].get(name, 0) > 0 for name in scaling.resources_per_worker)
    ]
    assert hosts and all(spec["resources"].get("GPU", 0) >= 1 for spec in hosts)
    assert scaling.num_workers <= sum(spec["max_workers"] * spec["resources"]["GPU"] for spec in hosts)
    for spec in hosts:
        per_node = min(spec["resources"]["GPU"], scaling.num_workers)
        assert per_node * scaling.cpus_per_worker < spec["resources"]["CPU"], "no CPU left for data preprocessing"
    assert (REPO / config.deepspeed.config).is_file()
    assert config.storage.region == launcher["provider"]["region"]
    for uri in (config.model, config.data.manifest, config.data.image_root, config.output):
        assert uri.startswith("s3://YOUR-BUCKET/"), uri
