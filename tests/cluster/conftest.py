"""Fixtures shared by the cluster-config tests: the repo's pinned versions and its cluster files."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def locked_versions() -> dict[str, str]:
    """`requirements.lock` as {normalised name: version}."""
    versions: dict[str, str] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line)
        if match:
            versions[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return versions


@pytest.fixture(scope="session")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="session")
def launcher() -> dict[str, Any]:
    """cluster/aws-gpu.yaml as written (not yet filled out with Ray's defaults)."""
    return _load_yaml(REPO / "cluster" / "aws-gpu.yaml")


@pytest.fixture(scope="session")
def raycluster() -> dict[str, Any]:
    return _load_yaml(REPO / "cluster" / "kuberay" / "raycluster.yaml")


@pytest.fixture(scope="session")
def rayjobs() -> dict[str, dict[str, Any]]:
    """Every RayJob manifest under cluster/kuberay/, by file name."""
    return {path.name: _load_yaml(path) for path in sorted((REPO / "cluster" / "kuberay").glob("rayjob-*.yaml"))}
