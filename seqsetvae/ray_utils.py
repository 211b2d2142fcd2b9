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
