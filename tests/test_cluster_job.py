"""The pipeline as a Ray job on a real head started with `ray start --head` on 127.0.0.1, with token authentication.

The head lives in a short temporary directory of its own, so a local `ray.init()`
in other tests never finds it, and RAY_ADDRESS is set only in the environment
of the processes started here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient
from safetensors.torch import load_file

from seqsetvae.export import load_export

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")

SMALL_MODEL = [
    "--d-model", "32", "--latent-dim", "8", "--n-inducing", "8", "--n-heads", "2",
    "--n-set-layers", "1", "--n-seq-layers", "1", "--max-sets", "24", "--max-events-per-set", "24",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Head:
    root: Path
    pgid: int
    dashboard: str
    env: dict[str, str]

    @property
    def token(self) -> str:
        return (Path(self.env["HOME"]) / ".ray" / "auth_token").read_text().strip()

    def client(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})


def head_environment(root: Path) -> dict[str, str]:
    """Return the environment of the head and of the clients on this machine."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    env.update(
        # Ray writes and reads the token under HOME: ~/.ray/auth_token.
        HOME=str(root / "home"),
        RAY_AUTH_MODE="token",
        # Ray replaces 127.0.0.1 in --node-ip-address by the machine's network
        # address unless this is 0 (services.resolve_ip_for_localhost, Ray 2.60).
        # At 0, every Ray process of the head listens on 127.0.0.1.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # Fixed default ports of the metrics servers, moved off other Ray instances.
        DASHBOARD_METRIC_PORT=str(free_port()),
        AUTOSCALER_METRIC_PORT=str(free_port()),
        # The job's `python3` is the head's, as for a head started from this virtual environment.
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def head_processes(head: Head) -> list[psutil.Process]:
    """Return the live processes of the head: its process group, and anything running from its directory."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            in_group = os.getpgid(process.pid) == head.pgid
            from_root = str(head.root) in " ".join(process.info["cmdline"] or []) or process.cwd().startswith(str(head.root))
        except (psutil.Error, ProcessLookupError):
            continue
        if in_group or from_root:
            found.append(process)
    return found


def stop_head(head: Head) -> None:
    """Stop the processes of this head only; `ray stop` would stop every Ray instance on the machine."""
    try:
        os.killpg(head.pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while head_processes(head) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in head_processes(head):
        try:
            process.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_head():
    # Ray's Unix socket paths must stay under about 107 bytes, so the directory is short.
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (root / "home").mkdir()
    env = head_environment(root)
    subprocess.run([VENV_BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    dashboard_port = free_port()
    start = subprocess.Popen(
        [
            VENV_BIN / "ray", "start", "--head", "--port=0", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            f"--temp-dir={root / 't'}", "--num-cpus=2", "--disable-usage-stats",
        ],
        env=env,
        cwd=root,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    head = Head(root=root, pgid=start.pid, dashboard=f"http://127.0.0.1:{dashboard_port}", env=env)
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output
        yield head
    finally:
        if start.poll() is None:
            start.kill()
        stop_head(head)
        shutil.rmtree(root, ignore_errors=True)


def client_environment(head: Head, home: Path) -> dict[str, str]:
    """Return the environment of a user's shell: no Ray variables, the token (if any) under `home`."""
    env = {name: value for name, value in head.env.items() if not name.startswith("RAY_")}
    env["HOME"] = str(home)
    return env


def seqsetvae(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seqsetvae.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def submitted(ray_head, small_meds):
    out = ray_head.root / "run"
    storage = f"file://{ray_head.root / 'storage'}"
    result = seqsetvae(
        [
            "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT),
            "--data", str(small_meds), "--out", str(out), "--storage", storage,
            "--max-epochs", "1", "--num-workers", "1", "--batch-size", "16", "--beta-warmup-steps", "5",
            "--num-samples", "2", "--max-concurrent-trials", "2", "--finetune-max-epochs", "3",
            *SMALL_MODEL,
        ],
        client_environment(ray_head, Path(ray_head.env["HOME"])),
        timeout=420,
    )  # fmt: skip
    return result, out, storage


def test_head_listens_on_loopback_only(ray_head):
    listening = []
    pids = {process.pid for process in head_processes(ray_head)}
    for connection in psutil.net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in pids:
            listening.append(connection.laddr.ip)
    assert listening
    assert set(listening) <= set(LOOPBACK)


def test_submit_without_token_is_rejected(ray_head, tmp_path):
    result = seqsetvae(
        ["submit", "--address", ray_head.dashboard, "--out", str(tmp_path / "run")],
        client_environment(ray_head, tmp_path),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"seqsetvae submit: error: the Ray cluster at {ray_head.dashboard} requires a token")
    assert result.stderr.count("\n") == 1


def test_submitted_job_succeeds(submitted, ray_head):
    result, _, _ = submitted
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.split("Submitted Ray job ", 1)[1].split()[0]
    assert f"Ray job {job_id} finished with status SUCCEEDED" in result.stdout
    # The job's own output, streamed while it ran.
    assert "INFO seqsetvae.pipeline: Stage 1/" in result.stdout
    assert "seqsetvae run summary" in result.stdout
    client = ray_head.client()
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "seqsetvae run summary" in client.get_job_logs(job_id)
    entrypoint = client.get_job_info(job_id).entrypoint
    assert entrypoint.startswith("python3 -m jobs.pipeline ")
    assert "--address" not in entrypoint


def test_job_exported_model(submitted):
    result, out, _ = submitted
    assert result.returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 2
    model = load_export(out / "export")
    assert model.head.in_features == 2 * 8


@pytest.mark.parametrize("form", ["file-uri", "path"])
def test_best_from_storage_alone(submitted, ray_head, form):
    result, out, storage = submitted
    assert result.returncode == 0
    location = storage if form == "file-uri" else storage.removeprefix("file://")
    export = ray_head.root / f"best-{form}"
    best = seqsetvae(["best", "--sweep", location, "--export", str(export)], client_environment(ray_head, ray_head.root), 120)
    assert best.returncode == 0, best.stderr
    assert f"Exported model: {export}" in best.stdout
    for name in ("head.safetensors", "encoder.safetensors"):
        ours = load_file(str(export / name))
        theirs = load_file(str(out / "export" / name))
        assert ours.keys() == theirs.keys()
        assert all((ours[key] == theirs[key]).all() for key in ours)
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["val_auprc"] == pytest.approx(summary["val_auprc"])
