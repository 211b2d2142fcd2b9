"""Starting or joining Ray, and the small GPU/CPU branches of distributed training."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local Ray instance bound to 127.0.0.1, or join the cluster at `address`.

    Does nothing when Ray is already initialised in this process, for example
    inside a Ray job, where `address` is taken from the job's environment.
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
    ray.init(
        num_cpus=num_cpus,
        # The dashboard serves Ray's state API, which Ray Train uses to watch its controller.
        include_dashboard=True,
        dashboard_host=LOCAL_HOST,
        _node_ip_address=LOCAL_HOST,
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def ddp_backend(use_gpu: bool) -> str:
    """Return the torch.distributed backend: NCCL for GPUs, gloo for CPUs."""
    return "nccl" if use_gpu else "gloo"


def lightning_accelerator(use_gpu: bool) -> str:
    return "gpu" if use_gpu else "cpu"


def cpus_per_worker(requested: int, num_workers: int) -> int:
    """Return the CPUs each Ray Train worker reserves; 0 divides the cluster's CPUs evenly.

    Ray sets each worker's torch thread count from this, so on a small machine
    one worker with every core trains as fast as several workers with one each.
    """
    if requested > 0:
        return requested
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, total // num_workers)
