"""cluster/aws-gpu.yaml passes Ray's own cluster-launcher validation and does what issue #7 asks."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import botocore.session
import jsonschema
import pytest
from botocore.exceptions import ParamValidationError
from botocore.validate import validate_parameters
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

from uhr.storage import DEFAULT_GDAL_OPTIONS, StorageConfig

REPO = Path(__file__).resolve().parents[2]

# vCPUs and GPUs of the EC2 instance types the config uses (AWS instance type documentation).
INSTANCE_TYPES: dict[str, dict[str, Any]] = {
    "m6i.2xlarge": {"CPU": 8},
    "m6i.4xlarge": {"CPU": 16},
    "g5.2xlarge": {"CPU": 8, "GPU": 1, "accelerator": "A10G"},
    "p5.48xlarge": {"CPU": 192, "GPU": 8, "accelerator": "H100"},
}


def _worker_types(launcher: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = launcher["head_node_type"]
    return {name: spec for name, spec in launcher["available_node_types"].items() if name != head}


def _docker_env(launcher: dict[str, Any]) -> dict[str, str]:
    """The `--env NAME=VALUE` options of the containers every node runs."""
    words = [word for option in launcher["docker"]["run_options"] for word in shlex.split(option)]
    env = {}
    for flag, value in zip(words, words[1:]):
        if flag in ("--env", "-e"):
            name, _, setting = value.partition("=")
            env[name] = setting
    return env


def _ray_start_options(command: str) -> dict[str, str]:
    words = shlex.split(command.split(";")[-1])
    assert words[:2] == ["ray", "start"], command
    return dict(word.removeprefix("--").partition("=")[::2] for word in words[2:])


def test_passes_ray_validation(launcher: dict[str, Any]) -> None:
    # What `ray up` does first: fill in the AWS defaults, then check against ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(launcher)))


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ((), "idle_timeout_minute", 5, "'idle_timeout_minute' was unexpected"),
        (("available_node_types", "gpu-a10g"), "max_worker", 4, "'max_worker' was unexpected"),
        (("docker",), "run_option", [], "'run_option' was unexpected"),
        (("available_node_types", "gpu-a10g", "resources"), "GPU", 0.5, "is not of type 'integer'"),
    ],
)
def test_ray_validation_rejects_mistakes(
    launcher: dict[str, Any], where: tuple[str, ...], key: str, value: Any, message: str
) -> None:
    broken = copy.deepcopy(launcher)
    node = broken
    for name in where:
        node = node[name]
    node[key] = value
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        validate_config(prepare_config(broken))


def test_node_configs_are_valid_run_instances_requests(launcher: dict[str, Any]) -> None:
    # Ray passes node_config to EC2 RunInstances unchanged; its schema there is free-form, so a
    # misspelt field would only fail at `ray up`. botocore's model of the API catches it here.
    model = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    known_types = set(model.input_shape.members["InstanceType"].enum)
    for name, node_type in launcher["available_node_types"].items():
        request = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}
        validate_parameters(request, model.input_shape)
        assert request["InstanceType"] in known_types, name
    misspelt = {**launcher["available_node_types"]["gpu-a10g"]["node_config"], "InstanceTyp": "g5.2xlarge"}
    with pytest.raises(ParamValidationError, match="InstanceTyp"):
        validate_parameters({**misspelt, "MinCount": 1, "MaxCount": 1}, model.input_shape)


def test_declared_resources_match_the_instances(launcher: dict[str, Any]) -> None:
    # Declared resources replace what Ray would detect: they must be what the machine has.
    for name, spec in _worker_types(launcher).items():
        instance = INSTANCE_TYPES[spec["node_config"]["InstanceType"]]
        expected = {"CPU": instance["CPU"]}
        if "GPU" in instance:
            expected |= {"GPU": instance["GPU"], f"accelerator_type:{instance['accelerator']}": 1}
        assert spec["resources"] == expected, name


def test_head_runs_no_tasks_and_workers_scale_from_zero(launcher: dict[str, Any]) -> None:
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = _worker_types(launcher)
    gpu_types = {spec["node_config"]["InstanceType"] for spec in workers.values() if spec["resources"].get("GPU")}
    accelerators = {INSTANCE_TYPES[instance]["accelerator"] for instance in gpu_types}
    assert "A10G" in accelerators and accelerators & {"A100", "H100"}
    assert any("GPU" not in spec["resources"] for spec in workers.values()), "no CPU worker type for reading"
    for name, spec in workers.items():
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1, name
    assert sum(spec["max_workers"] for spec in workers.values()) <= launcher["max_workers"]
    assert 0 < launcher["idle_timeout_minutes"] <= 15
    assert launcher["upscaling_speed"] > 0
    # Idle nodes are terminated, not stopped (a stopped GPU instance still holds its volumes).
    assert launcher["provider"]["cache_stopped_nodes"] is False


def test_dashboard_is_private(launcher: dict[str, Any]) -> None:
    (start,) = [command for command in launcher["head_start_ray_commands"] if "ray start" in command]
    assert _ray_start_options(start)["dashboard-host"] == "127.0.0.1"
    assert "0.0.0.0" not in (REPO / "cluster" / "aws-gpu.yaml").read_text()
    # No extra inbound rules: Ray's security group opens only SSH from outside the cluster.
    assert "security_group" not in launcher["provider"]
    for node_type in launcher["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]
        assert "NetworkInterfaces" not in node_type["node_config"]


def test_token_auth_on_every_node(launcher: dict[str, Any]) -> None:
    assert _docker_env(launcher)["RAY_AUTH_MODE"] == "token"
    # The token made by `ray get-auth-token --generate` reaches every node through file_mounts.
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=disabled" not in command


def test_gdal_environment_is_the_storage_default(launcher: dict[str, Any]) -> None:
    env = _docker_env(launcher)
    gdal = {name: value for name, value in env.items() if name.startswith(("GDAL_", "CPL_", "VSI_"))}
    assert gdal == {**DEFAULT_GDAL_OPTIONS, "GDAL_CACHEMAX": str(StorageConfig().gdal_cache_mb)}
    assert env["AWS_REGION"] == launcher["provider"]["region"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)


def test_setup_installs_a_pinned_revision_with_the_lock(launcher: dict[str, Any], pyproject: dict[str, Any]) -> None:
    (setup,) = launcher["setup_commands"]
    revision = re.search(r"\bUHR_REVISION=(\S+?);", setup).group(1)
    assert revision not in ("main", "master", "HEAD", "latest")
    assert re.fullmatch(r"v\d+\.\d+\.\d+|[0-9a-f]{40}", revision), revision
    assert 'pip install --quiet -r "$UHR_REPO/raw/$UHR_REVISION/requirements.lock"' in setup
    assert f'"{pyproject["project"]["name"]} @ $UHR_REPO/archive/$UHR_REVISION.tar.gz"' in setup
    assert "--no-deps" in setup
    assert (REPO / "requirements.lock").is_file()


def test_images_carry_the_locked_ray_and_a_supported_python(
    launcher: dict[str, Any], locked_versions: dict[str, str], pyproject: dict[str, Any]
) -> None:
    docker = launcher["docker"]
    images = [docker["image"], docker["head_image"]] + [
        spec["docker"]["worker_image"] for spec in launcher["available_node_types"].values() if "docker" in spec
    ]
    supported = SpecifierSet(pyproject["project"]["requires-python"])
    for image in images:
        match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<major>3)(?P<minor>\d+)-(?P<kind>cpu|gpu)", image)
        assert match, image
        assert match["ray"] == locked_versions["ray"], image
        assert f"{match['major']}.{match['minor']}" in supported, image
    # GPU nodes need the CUDA image; CPU-only nodes get the smaller one.
    assert docker["image"].endswith("-gpu")
