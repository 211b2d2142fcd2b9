"""Helpers shared by the benchmarks: the machine description, peak memory, timing and the results file."""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"


def machine() -> dict:
    """Describe the machine a figure was measured on: CPU, cores, memory, GPU, library versions and load."""
    import numpy
    import torch

    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "cpu": cpu_model,
        "cpu_cores": os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def peak_rss_gb() -> float:
    """Return the peak resident set size of this process in GB, memory-mapped file pages included.

    Reads VmHWM from /proc/self/status, which starts afresh at exec. ru_maxrss
    does not fit here because Linux keeps it across exec, so a child would
    report its parent's peak when that is larger.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("/proc/self/status has no VmHWM line; peak memory is measured on Linux only")


def cpu_seconds() -> float:
    """Return the user + system CPU seconds of this process, which other processes on the machine barely change."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(module: str, *args: str, env: dict | None = None) -> dict:
    """Run `python -m module args` in a fresh process and return the JSON object on its last output line.

    A fresh process gives each stage its own peak memory and start-up cost.
    """
    command = [sys.executable, "-m", module, *args]
    completed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parent.parent
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {completed.returncode}:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def update_results(figures: dict, path: Path = RESULTS_PATH) -> dict:
    """Merge `figures` into the results file, keeping the keys of benchmarks that did not run, and return it.

    A lock file serialises benchmarks that run at the same time.
    """
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}
        results.update(figures)
        path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def benchmark_main(doc: str, measure, full, quick, detail_key: str, quick_help: str) -> None:
    """Run `measure` at the full or, with `--quick`, the quick sizes and merge its figures into the results file.

    Prints the figures except the detailed record under `detail_key`.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--workdir", help="directory for temporary data (default: the system temporary directory)")
    args = parser.parse_args()
    figures = measure(quick if args.quick else full, args.workdir)
    update_results(figures)
    print(json.dumps({key: value for key, value in figures.items() if key != detail_key}, indent=2))
