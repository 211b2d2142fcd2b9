"""cluster.yaml validates against the cluster-launcher schema shipped in the ray package."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load_cluster_config(), schema)


def test_cluster_has_gpu_worker_type():
    node_types = load_cluster_config()["available_node_types"]
    gpu_types = [name for name, spec in node_types.items() if spec.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types
    assert all(node_types[name]["max_workers"] >= node_types[name]["min_workers"] for name in gpu_types)


def test_cluster_setup_installs_project():
    config = load_cluster_config()
    assert any("pip install" in command and "seqsetvae" in command for command in config["setup_commands"])
    assert "." in config["file_mounts"].values()
