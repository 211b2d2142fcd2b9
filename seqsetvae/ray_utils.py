"""Starting or joining Ray, and the small GPU/CPU branches of distributed training."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
from ray._private import ray_constants

logger = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local Ray instance with its dashboard on 127.0.0.1, or join the cluster at `address`.

    Does nothing when Ray is already initialised in this process, for example
    inside a Ray job, where `address` is taken from the job's environment.

    Every process of a local instance listens on 127.0.0.1 (see `_loopback_only`).
    """
    if ray.is_initialized():
        return
    if address:
        logger.info("Joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return
    if os.environ.get("RAY_ADDRESS"):
        logger.info("Joining Ray cluster from RAY_ADDRESS")
        ray.init(logging_level=logging.WARNING)
        return
    logger.info("Starting a local Ray instance on %s", LOCAL_HOST)
    with _loopback_only():
        ray.init(
            # "local" starts a new instance even when `ray start` left a cluster running on this machine.
            address="local",
            num_cpus=num_cpus,
            # The dashboard serves Ray's state API, which Ray Train uses to watch its controller.
            include_dashboard=True,
            dashboard_host=LOCAL_HOST,
            _node_ip_address=LOCAL_HOST,
            logging_level=logging.WARNING,
            configure_logging=True,
        )


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Switch Ray to its single-machine mode, so a node started in this block listens on 127.0.0.1 only.

    NOTE: Ray 2.60 replaces 127.0.0.1 by the machine's network address
    (services.resolve_ip_for_localhost) unless ray_constants.ENABLE_RAY_CLUSTER
    is false. The driver reads that constant, and the processes Ray spawns read
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when they import Ray, so both are set here
    and restored on exit. A later `ray.init(address=...)` then joins a cluster as before.
    """
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_variable = os.environ.get(name)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_variable is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_variable


def ddp_backend(use_gpu: bool) -> str:
    """Return the torch.distributed backend: NCCL for GPUs, gloo for CPUs."""
    return "nccl" if use_gpu else "gloo"


def lightning_accelerator(use_gpu: bool) -> str:
    return "gpu" if use_gpu else "cpu"


def worker_resources(use_gpu: bool, cpus: int) -> dict[str, int]:
    """Return the resources each Ray Train worker reserves: its CPUs, and one GPU with `use_gpu`."""
    return {"CPU": cpus, "GPU": 1} if use_gpu else {"CPU": cpus}


def cpus_per_worker(requested: int, num_workers: int, use_gpu: bool = False) -> int:
    """Return the CPUs each Ray Train worker reserves; 0 divides the cluster's CPUs evenly on CPU runs.

    Ray sets each worker's torch thread count from this, so on a small machine
    one worker with every core trains as fast as several workers with one each.
    A GPU worker reserves 1 CPU unless asked for more: a share of the whole
    cluster's CPUs could exceed the CPUs of one GPU node, and then no node fits the worker.
    """
    if requested > 0:
        return requested
    if use_gpu:
        return 1
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, total // num_workers)
