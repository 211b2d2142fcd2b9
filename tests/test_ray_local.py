"""A local Ray instance started by seqsetvae listens on 127.0.0.1 only."""

from __future__ import annotations

import os

import psutil
from ray._private import ray_constants

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
# Read at collection, before the session's Ray instance starts.
VARIABLE_BEFORE = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
CONSTANT_BEFORE = ray_constants.ENABLE_RAY_CLUSTER


def listening_addresses(root: psutil.Process) -> dict[str, set[str]]:
    """Return the addresses that `root` and its descendants listen on, by process name."""
    found: dict[str, set[str]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                found.setdefault(name, set()).add(connection.laddr.ip)
    return found


def test_every_ray_process_listens_on_loopback(ray_local):
    @ray_local.remote
    class Echo:
        def pid(self) -> int:
            return os.getpid()

    actor = Echo.remote()
    actor_pid = ray_local.get(actor.pid.remote())

    listening = listening_addresses(psutil.Process())
    # The instance is up: the GCS, the raylet and the actor's worker listen.
    assert {"gcs_server", "raylet"} <= set(listening)
    assert psutil.Process(actor_pid).net_connections(kind="inet")
    outside = {name: addresses - LOOPBACK for name, addresses in listening.items() if addresses - LOOPBACK}
    assert not outside
    ray_local.kill(actor)


def test_cluster_setting_restored_after_start(ray_local):
    # A later ray.init(address=...) in the same process must join a cluster with the network address.
    assert ray_constants.ENABLE_RAY_CLUSTER == CONSTANT_BEFORE
    assert os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) == VARIABLE_BEFORE
