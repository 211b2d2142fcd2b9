"""cluster.yaml, checked offline: Ray's schema, the launcher's own checks, GPU workers that install this project."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def load_cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def gpu_node_types(config: dict) -> list[str]:
    node_types = config["available_node_types"]
    return [name for name, spec in node_types.items() if spec.get("resources", {}).get("GPU", 0) >= 1]


def test_cluster_yaml_matches_ray_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load_cluster_config(), schema)


def test_cluster_yaml_passes_launcher_checks():
    # `ray up` runs these two steps on the file before it contacts the cloud provider.
    prepared = prepare_config(load_cluster_config())
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_worker_type_autoscales():
    config = load_cluster_config()
    gpu_types = gpu_node_types(config)
    assert gpu_types
    assert config["head_node_type"] not in gpu_types
    for name in gpu_types:
        spec = config["available_node_types"][name]
        assert 0 <= spec["min_workers"] < spec["max_workers"]
        assert spec["max_workers"] <= config["max_workers"]


def test_gpu_worker_setup_installs_project():
    config = load_cluster_config()
    mounted_checkouts = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted_checkouts
    for name in gpu_node_types(config):
        spec = config["available_node_types"][name]
        # A node type's own worker_setup_commands replace the shared ones.
        commands = spec.get("worker_setup_commands") or config["setup_commands"] + config.get("worker_setup_commands", [])
        installed = [shlex.split(command)[-1] for command in commands if re.search(r"\bpip install\b.*-e ", command)]
        assert set(installed) & set(mounted_checkouts)


def test_every_node_requires_token():
    config = load_cluster_config()
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts
        assert all(command.startswith("RAY_AUTH_MODE=token ") for command in starts)


def test_head_dashboard_on_loopback():
    starts = [command for command in load_cluster_config()["head_start_ray_commands"] if "ray start" in command]
    assert all("--dashboard-host=127.0.0.1" in command for command in starts)


def test_workers_join_head_port():
    config = load_cluster_config()
    head_start = next(command for command in config["head_start_ray_commands"] if "ray start" in command)
    port = re.search(r"--port=(\d+)", head_start).group(1)
    worker_start = next(command for command in config["worker_start_ray_commands"] if "ray start" in command)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker_start


def test_upload_leaves_out_local_state():
    config = load_cluster_config()
    assert ".gitignore" in config["rsync_filter"]
    assert {".git", ".venv", "runs"} <= set(config["rsync_exclude"])
