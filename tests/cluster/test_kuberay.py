"""The KubeRay manifests pass a strict check of every key they use, and say what issue #7 asks.

The API server validates a RayCluster or RayJob against KubeRay's CRD schema, which prunes
unknown keys without a word: `minReplica: 0` or a misplaced `nvidia.com/gpu` would be dropped and
the cluster would come up wrong. The check here is that schema (KubeRay v1.7.0, stored by
`data/make_kuberay_schema.py`) with unknown keys forbidden wherever the schema lists the known
ones, as `kubeconform -strict` does.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import validate_config

from uhr.storage import DEFAULT_GDAL_OPTIONS, StorageConfig

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = Path(__file__).with_name("data") / "kuberay-v1.7.0.schema.json"

# What a manifest may set in metadata (Kubernetes ObjectMeta; the CRD leaves it open).
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
}

# Maps with free keys in our manifests (labels, quantities by resource name, ray start flags).
FREE_FORM = {"labels", "annotations", "nodeSelector", "rayStartParams", "limits", "requests"}


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with `additionalProperties: false` wherever it lists properties and does not ask
    to keep unknown fields."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(sub) for sub in schema[key]]
    return schema


def _crd_schemas() -> dict[str, dict[str, Any]]:
    rayjob = json.loads(SCHEMA_FILE.read_text())["schema"]
    # The RayCluster CRD is the RayJob CRD with spec = RayJob.spec.rayClusterSpec (checked when stored).
    raycluster = copy.deepcopy(rayjob)
    raycluster["properties"]["spec"] = rayjob["properties"]["spec"]["properties"]["rayClusterSpec"]
    schemas = {}
    for kind, schema in (("RayCluster", raycluster), ("RayJob", rayjob)):
        schema["properties"] |= {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": OBJECT_META,
        }
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        schemas[kind] = _strict(schema)
    return schemas


SCHEMAS = _crd_schemas()
VALIDATORS = {kind: jsonschema.Draft7Validator(schema) for kind, schema in SCHEMAS.items()}


def manifest_problems(doc: dict[str, Any]) -> list[str]:
    """Every key or value of a RayCluster/RayJob manifest that KubeRay v1.7 would not take as
    written, as "path: problem"."""
    validator = VALIDATORS.get(doc.get("kind"))
    if validator is None:
        return [f"kind: {doc.get('kind')!r} is not one of {sorted(VALIDATORS)}"]
    problems = []
    for error in validator.iter_errors(doc):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        problems.append(f"{path or '<root>'}: {error.message}")
    return sorted(problems)


def _is_free_form(path: tuple[Any, ...]) -> bool:
    if path[-1] == "resources":
        # A group's `resources` maps Ray resource names to quantities; a container's does not.
        return path[-2:-1] == ("headGroupSpec",) or path[-3:-2] == ("workerGroupSpecs",)
    return path[-1] in FREE_FORM


def _key_paths(node: Any, path: tuple[Any, ...] = (), skip: tuple[str, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths of every mapping key in `node`, outside free-form maps and below keys in `skip`."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + (key,)
            if not _is_free_form(path + (key,)) and key not in skip:
                yield from _key_paths(value, path + (key,), skip)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _key_paths(item, path + (index,))


def _renamed(doc: dict[str, Any], path: tuple[Any, ...], suffix: str = "x") -> dict[str, Any]:
    broken = copy.deepcopy(doc)
    parent = broken
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1] + suffix] = parent.pop(path[-1])
    return broken


def _manifests(raycluster: dict[str, Any], rayjobs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {"raycluster.yaml": raycluster, **rayjobs}


def _containers(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in cluster_spec["workerGroupSpecs"]
    ]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield name, container


def test_manifests_pass_the_strict_check(raycluster: dict[str, Any], rayjobs: dict[str, dict[str, Any]]) -> None:
    assert set(rayjobs) == {"rayjob-vqa.yaml", "rayjob-finetune.yaml"}
    for name, doc in _manifests(raycluster, rayjobs).items():
        assert manifest_problems(doc) == [], name


def test_every_misspelt_key_is_caught(raycluster: dict[str, Any], rayjobs: dict[str, dict[str, Any]]) -> None:
    # Rename each key of each manifest in turn (outside maps whose keys are free): each must fail.
    # A RayJob's rayClusterSpec is the RayCluster's spec (test below), so its keys are tried once.
    for name, doc in _manifests(raycluster, rayjobs).items():
        paths = list(_key_paths(doc, skip=("rayClusterSpec",)))
        assert len(paths) > (50 if doc["kind"] == "RayCluster" else 10), name
        for path in paths:
            problems = manifest_problems(_renamed(doc, path))
            assert problems, f"{name}: renaming {'.'.join(map(str, path))} went unnoticed"


GPU_LIMITS = ("workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources", "limits")


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("workerGroupSpecs", 1, "maxReplicas"), "8", "'8' is not of type 'integer'"),
        ((*GPU_LIMITS, "memory"), "26GiB", "'26GiB' does not match"),
        (("autoscalerOptions", "version"), "v3", "'v3' is not one of"),
        (("authOptions", "mode"), "Token", "'Token' is not one of"),
        (("workerGroupSpecs", 0, "groupName"), None, "'groupName' is a required property"),
    ],
    ids=["string-count", "bad-quantity", "autoscaler-version", "auth-mode", "missing-group-name"],
)
def test_wrong_values_are_caught(raycluster: dict[str, Any], path: tuple[Any, ...], value: Any, expected: str) -> None:
    broken = copy.deepcopy(raycluster)
    parent = broken["spec"]
    for step in path[:-1]:
        parent = parent[step]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    problems = manifest_problems(broken)
    assert any(expected in problem for problem in problems), problems


def test_raycluster_autoscales_from_zero(raycluster: dict[str, Any], launcher: dict[str, Any]) -> None:
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    # Same idle timeout as the launcher config: both clusters give nodes back alike.
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == launcher["idle_timeout_minutes"] * 60
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]
        assert group["maxReplicas"] >= 1, group["groupName"]


def test_ray_reads_the_groups_as_the_launcher_types(raycluster: dict[str, Any], launcher: dict[str, Any]) -> None:
    # The autoscaler's own translation of the RayCluster (as the API server returns it, with a
    # namespace), checked with Ray's launcher schema.
    live = copy.deepcopy(raycluster)
    live["metadata"]["namespace"] = "default"
    derived = _derive_autoscaling_config_from_ray_cr(live)
    validate_config(derived)
    types = derived["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0 and "GPU" not in types["headgroup"]["resources"]
    head = launcher["head_node_type"]
    expected = {name: spec for name, spec in launcher["available_node_types"].items() if name != head}
    assert set(types) - {"headgroup"} == set(expected)
    for name, spec in expected.items():
        assert (types[name]["min_workers"], types[name]["max_workers"]) == (0, spec["max_workers"]), name
        for resource in ("GPU", "accelerator_type:A10G", "accelerator_type:H100"):
            assert types[name]["resources"].get(resource, 0) == spec["resources"].get(resource, 0), (name, resource)
        # A pod reserves a little less CPU than the instance has, for Kubernetes' own daemons.
        assert 0.85 * spec["resources"]["CPU"] <= types[name]["resources"]["CPU"] <= spec["resources"]["CPU"], name


def test_gpu_pods_ask_kubernetes_for_their_gpus(raycluster: dict[str, Any]) -> None:
    for name, container in _containers(raycluster["spec"]):
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, name  # guaranteed QoS: no pod is evicted for using what it asked
        if name.startswith("gpu-"):
            assert int(limits["nvidia.com/gpu"]) >= 1, name
        else:
            assert "nvidia.com/gpu" not in limits, name


def test_token_auth_and_a_private_dashboard(raycluster: dict[str, Any]) -> None:
    spec = raycluster["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)


def test_pods_get_the_storage_environment(raycluster: dict[str, Any]) -> None:
    expected = {**DEFAULT_GDAL_OPTIONS, "GDAL_CACHEMAX": str(StorageConfig().gdal_cache_mb)}
    for name, container in _containers(raycluster["spec"]):
        env = {item["name"]: item["value"] for item in container["env"]}
        assert {key: value for key, value in env.items() if key != "AWS_REGION"} == expected, name
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env), name


def test_one_image_built_from_the_dockerfile(
    raycluster: dict[str, Any], locked_versions: dict[str, str], pyproject: dict[str, Any]
) -> None:
    spec = raycluster["spec"]
    assert spec["rayVersion"] == locked_versions["ray"]
    images = {container["image"] for _, container in _containers(spec)}
    assert images == {f"YOUR-REGISTRY/uhr:{pyproject['project']['version']}"}
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)$", dockerfile, flags=re.MULTILINE)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(locked_versions['ray'])}-py3\d+-gpu", base), base
    for source in re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), path


def test_rayjobs_run_on_the_raycluster_spec_and_clean_up(
    raycluster: dict[str, Any], rayjobs: dict[str, dict[str, Any]]
) -> None:
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", (REPO / "cluster" / "Dockerfile").read_text(), flags=re.MULTILINE)
    for name, job in rayjobs.items():
        spec = job["spec"]
        # One cluster definition: a job's cluster is the RayCluster of raycluster.yaml.
        assert spec["rayClusterSpec"] == raycluster["spec"], name
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert 0 < spec["ttlSecondsAfterFinished"] <= 3600, name
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1, name
        # The image's checkout, in place on every pod: nothing to upload, any submission mode.
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": f"local://{workdir}"}, name
