"""Submit the pipeline to a running Ray cluster as a Ray job, and follow it to the end.

The job runs `python3 -m jobs.pipeline ARGS` with the head node's `python3`,
in a copy of the local working directory that Ray uploads. Inside the job
Ray sets RAY_ADDRESS, so the pipeline joins the cluster instead of starting
Ray itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from seqsetvae.errors import UserInputError

logger = logging.getLogger(__name__)

PIPELINE_MODULE = "jobs.pipeline"

# Kept out of the uploaded working directory: version control, virtual
# environments and run outputs. Ray limits the upload to its gRPC message size
# (512 MiB in Ray 2.60) and also skips what .gitignore lists.
WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", "runs", "out", "build", "__pycache__", "*.egg-info", ".pytest_cache"]

# Ray's job client reads the cluster address from these variables in preference
# to the address passed to it, in this order.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

POLL_SECONDS = 2.0


def find_auth_token(environ: Mapping[str, str] = os.environ, home: Path | None = None) -> tuple[str | None, str]:
    """Return Ray's authentication token and where it came from, or (None, "") when there is none.

    The sources and their order are Ray's own (Ray 2.52 and later): the
    RAY_AUTH_TOKEN variable, the file named by RAY_AUTH_TOKEN_PATH, then
    ~/.ray/auth_token, which `ray get-auth-token --generate` writes.

    Raises:
        UserInputError: RAY_AUTH_TOKEN_PATH names a file that is missing or empty.
    """
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise UserInputError(
                f"RAY_AUTH_TOKEN_PATH={path}: file missing or empty; point it at the cluster's token file or unset it"
            )
        return token, str(path)
    default = (home if home is not None else Path.home()) / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, ""


def cluster_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """Return the dashboard address to submit to, from --address or Ray's address variables.

    Raises:
        UserInputError: no address is given, or --address differs from a variable
            that Ray's job client would use instead of it.
    """
    for name in ADDRESS_VARIABLES:
        value = environ.get(name)
        if not value:
            continue
        if address and address.rstrip("/") != value.rstrip("/"):
            raise UserInputError(
                f"--address {address} differs from {name}={value}, which Ray's job client uses instead; "
                f"unset {name} or pass the same address"
            )
        return value
    if not address:
        raise UserInputError("missing --address; pass the cluster's dashboard address, for example http://127.0.0.1:8265")
    return address


def connect(address: str | None, environ: Mapping[str, str] = os.environ, home: Path | None = None):
    """Return a JobSubmissionClient for the cluster, sending Ray's token when one is found."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = cluster_address(address, environ)
    token, source = find_auth_token(environ, home)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        if token:
            raise UserInputError(
                f"the Ray cluster at {url} rejected the token from {source}; copy the token of this cluster "
                "(`ray get-auth-token` on its head node) to ~/.ray/auth_token or RAY_AUTH_TOKEN"
            ) from None
        raise UserInputError(
            f"the Ray cluster at {url} requires a token and none was found; copy the head node's ~/.ray/auth_token "
            "to this machine, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
        ) from None
    except ConnectionError:
        raise UserInputError(
            f"cannot connect to a Ray dashboard at {url}; check --address and that the cluster's head node is running"
        ) from None


def check_job_paths(pipeline_args: Sequence[str]) -> None:
    """Reject relative output paths, which would point into the job's temporary copy of the working directory.

    Raises:
        UserInputError: --out or --storage is a relative path.
    """
    for flag in ("--out", "--storage"):
        value = _option_value(pipeline_args, flag)
        if value and "://" not in value and not Path(value).is_absolute():
            raise UserInputError(
                f"{flag} {value}: a relative path would land in the job's temporary copy of the working directory; "
                "give an absolute path on the cluster, or a URI for --storage"
            )


def _option_value(args: Sequence[str], flag: str) -> str | None:
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def submit_pipeline(client, pipeline_args: Sequence[str], working_dir: str | Path) -> str:
    """Submit `python3 -m jobs.pipeline ARGS` with `working_dir` uploaded; return the submission ID."""
    root = Path(working_dir).resolve()
    if not (root / "jobs" / "pipeline.py").is_file():
        raise UserInputError(
            f"--working-dir {root}: jobs/pipeline.py not found; pass the root of a seqsetvae checkout"
        )
    entrypoint = shlex.join(["python3", "-m", PIPELINE_MODULE, *pipeline_args])
    runtime_env = {"working_dir": str(root), "excludes": WORKING_DIR_EXCLUDES}
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    logger.info("Submitted Ray job %s: %s", job_id, entrypoint)
    return job_id


def follow_job(client, job_id: str, write: Callable[[str], object]):
    """Pass the job's log output to `write` as it arrives, and return the job's final status."""
    try:
        asyncio.run(_stream_logs(client, job_id, write))
    except RuntimeError as error:
        # The log stream closes early when the connection drops; the job goes on.
        logger.warning("Log stream of job %s ended early (%s); waiting for the job to finish", job_id, error)
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(POLL_SECONDS)
        status = client.get_job_status(job_id)
    return status


async def _stream_logs(client, job_id: str, write: Callable[[str], object]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)
