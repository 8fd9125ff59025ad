"""Rebuild `kuberay-<version>.schema.json` from the CRDs of a KubeRay checkout.

    git -C kuberay checkout v1.7.0
    python tests/cluster/data/make_kuberay_schema.py kuberay v1.7.0

The output is the `v1` openAPIV3Schema of the RayJob CRD
(`ray-operator/config/crd/bases/ray.io_rayjobs.yaml`) with descriptions and `status` removed.
The RayCluster CRD is not stored: the script checks that its schema is the RayJob's with `spec`
replaced by `spec.rayClusterSpec`, which is how `tests/cluster/test_kuberay.py` rebuilds it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

CRD_DIR = Path("ray-operator/config/crd/bases")


def _v1_schema(crd_path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(crd_path.read_text())
    versions = {version["name"]: version for version in crd["spec"]["versions"]}
    if "v1" not in versions:
        raise SystemExit(f"{crd_path}: no v1 version (found {sorted(versions)})")
    return versions["v1"]["schema"]["openAPIV3Schema"]


def _without(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return {name: _without(value, key) for name, value in node.items() if name != key}
    if isinstance(node, list):
        return [_without(item, key) for item in node]
    return node


def build(checkout: Path, version: str) -> dict[str, Any]:
    """The stored document: {"kuberay_version", "crd", "schema"} for the RayJob CRD."""
    rayjob = _without(_v1_schema(checkout / CRD_DIR / "ray.io_rayjobs.yaml"), "description")
    raycluster = _without(_v1_schema(checkout / CRD_DIR / "ray.io_rayclusters.yaml"), "description")
    for schema in (rayjob, raycluster):
        schema["properties"].pop("status", None)
    cluster_spec = rayjob["properties"]["spec"]["properties"]["rayClusterSpec"]
    if raycluster["properties"]["spec"] != cluster_spec:
        raise SystemExit("RayCluster.spec differs from RayJob.spec.rayClusterSpec: store both schemas")
    top = {name: value for name, value in raycluster["properties"].items() if name != "spec"}
    if top != {name: value for name, value in rayjob["properties"].items() if name != "spec"}:
        raise SystemExit("RayCluster and RayJob differ outside spec: store both schemas")
    return {"kuberay_version": version, "crd": str(CRD_DIR / "ray.io_rayjobs.yaml"), "schema": rayjob}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="a KubeRay checkout at the release tag")
    parser.add_argument("version", help="the release tag, e.g. v1.7.0")
    args = parser.parse_args(argv)
    out = Path(__file__).with_name(f"kuberay-{args.version}.schema.json")
    out.write_text(json.dumps(build(args.checkout, args.version), sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
