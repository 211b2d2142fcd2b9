"""A sweep whose driver process is killed, then resumed with `seqsetvae tune --resume`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

N_SAMPLES = 5
# Each trial outlasts several of Tune's one-second state saves (about 5 s on 2 cores), so the kill
# lands mid-sweep. At 30 epochs a trial took under 1 s and a whole sweep could finish between two saves.
MAX_EPOCHS = 300


def trial_states(experiment: Path) -> dict[str, str]:
    """Return the status of each trial in the latest sweep state that Tune saved, by trial id."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except json.JSONDecodeError:
        return {}  # read while Tune was rewriting it
    trials = (json.loads(trial[0]) for trial in state["trial_data"])
    return {trial["trial_id"]: trial["status"] for trial in trials}


def trial_results(experiment: Path) -> dict[str, str]:
    """Return the result.json text of each trial directory, by trial id."""
    return {path.parent.name.split("_")[2]: path.read_text() for path in experiment.glob("head_trial_*/result.json")}


def trial_errors(experiment: Path) -> str:
    """Return the error files that Tune wrote for failed trials, joined for an assertion message."""
    return "\n".join(f"{path.parent.name}: {path.read_text()[-2000:]}" for path in experiment.glob("*/error.txt"))


def tune_command(meds: Path, pretrained: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "seqsetvae.cli", "tune", "--data", str(meds), "--pretrained-ckpt", str(pretrained),
        "--out", str(out), "--num-samples", str(N_SAMPLES), "--max-concurrent-trials", "2", "--max-epochs", str(MAX_EPOCHS), *extra,
    ]  # fmt: skip


@pytest.fixture
def ray_tmp():
    """Return a directory for Ray's sessions outside pytest's long temporary paths, and remove it afterwards."""
    directory = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_killed_sweep_resumes(small_meds, tiny_pretrained, tmp_path, ray_tmp):
    out = tmp_path / "sweep"
    experiment = out / "ray_results" / "sweep"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(
        tune_command(small_meds, tiny_pretrained, out), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            states = trial_states(experiment)
            if list(states.values()).count("TERMINATED") >= 2:
                break
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        # Anything the killed driver started in its session ends with it.
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    time.sleep(1)
    before = trial_states(experiment)
    finished = {trial for trial, status in before.items() if status == "TERMINATED"}
    assert 2 <= len(finished) < N_SAMPLES, f"kill should land mid-sweep; saved states: {before}"
    finished_results = {trial: text for trial, text in trial_results(experiment).items() if trial in finished}

    resumed = subprocess.run(tune_command(small_meds, tiny_pretrained, out, "--resume"), env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"over {N_SAMPLES} trials" in resumed.stdout

    after = trial_states(experiment)
    assert len(after) == N_SAMPLES
    assert set(after.values()) == {"TERMINATED"}, trial_errors(experiment) + resumed.stdout[-3000:]
    assert set(before) <= set(after)
    # A trial that had finished before the kill was not run again.
    results = trial_results(experiment)
    for trial in finished:
        assert results[trial] == finished_results[trial], trial

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == N_SAMPLES
    assert set(trials["trial_id"]) == set(after)
    # The restored Optuna search suggests new points; a fresh one would repeat the first suggestions.
    configs = trials.filter(like="config/").map(repr).agg("|".join, axis=1)
    assert configs.nunique() == N_SAMPLES
    assert (trials["epochs"] == MAX_EPOCHS).all()
    assert (out / "best" / "head.safetensors").is_file()
    # Tune deletes no checkpoint, so none that a saved state refers to can be missing on resume.
    for directory in experiment.glob("head_trial_*"):
        results = [json.loads(line) for line in (directory / "result.json").read_text().splitlines()]
        reported = {result["checkpoint_dir_name"] for result in results if result.get("checkpoint_dir_name")}
        assert reported <= {path.name for path in directory.glob("checkpoint_*")}, directory.name
