"""`seqsetvae submit` without a cluster: the token it sends, the address it uses, the arguments it forwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqsetvae.cli import build_parser, main, merged_options, pipeline_arguments
from seqsetvae.errors import UserInputError
from seqsetvae.submit import check_job_paths, cluster_address, find_auth_token, submit_pipeline

ROOT = Path(__file__).resolve().parents[1]


def write_token(home: Path, token: str) -> Path:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True)
    path.write_text(token + "\n")
    return path


def test_token_from_default_file(tmp_path):
    path = write_token(tmp_path, "file-token")
    assert find_auth_token({}, home=tmp_path) == ("file-token", str(path))


def test_token_variable_wins(tmp_path):
    write_token(tmp_path, "file-token")
    other = tmp_path / "other"
    other.write_text("path-token")
    assert find_auth_token({"RAY_AUTH_TOKEN": "env-token", "RAY_AUTH_TOKEN_PATH": str(other)}, home=tmp_path) == (
        "env-token",
        "RAY_AUTH_TOKEN",
    )
    assert find_auth_token({"RAY_AUTH_TOKEN_PATH": str(other)}, home=tmp_path) == ("path-token", str(other))


def test_token_path_missing_is_error(tmp_path):
    with pytest.raises(UserInputError, match="RAY_AUTH_TOKEN_PATH=.*missing: file missing or empty"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)


def test_no_token_found(tmp_path):
    assert find_auth_token({}, home=tmp_path) == (None, "")


def test_address_from_flag_or_variable():
    assert cluster_address("http://127.0.0.1:8265", {}) == "http://127.0.0.1:8265"
    assert cluster_address(None, {"RAY_ADDRESS": "http://127.0.0.1:9000"}) == "http://127.0.0.1:9000"
    assert cluster_address("http://127.0.0.1:9000/", {"RAY_ADDRESS": "http://127.0.0.1:9000"}) == "http://127.0.0.1:9000"


def test_address_conflicting_with_variable():
    with pytest.raises(UserInputError, match="--address http://127.0.0.1:8265 differs from RAY_API_SERVER_ADDRESS"):
        cluster_address("http://127.0.0.1:8265", {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9000"})


def test_address_missing():
    with pytest.raises(UserInputError, match="missing --address"):
        cluster_address(None, {})


@pytest.mark.parametrize(
    "args",
    [["--out", "runs/r1"], ["--out=runs/r1"], ["--out", "/abs/r1", "--storage", "ray_results"]],
    ids=["out", "out-equals", "storage"],
)
def test_relative_job_paths_rejected(args):
    with pytest.raises(UserInputError, match="relative path would land in the job's temporary copy"):
        check_job_paths(args)


def test_absolute_and_uri_job_paths_pass():
    check_job_paths(["--out", "/shared/runs/r1", "--storage", "s3://bucket/ray", "--data", "meds"])


def test_forwarded_arguments_parse_as_run(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("max_sets: 24\nfinetune_focal_alpha: null\n")
    parser = build_parser()
    submit = parser.parse_args(
        [
            "submit", "--address", "http://127.0.0.1:8265", "--config", str(config), "--out", "/shared/r1",
            "--storage", "file:///shared/ray", "--num-workers", "4", "--use-gpu", "--precision", "bf16-mixed",
            "--finetune-max-epochs", "3", "--num-samples", "2",
        ]
    )  # fmt: skip
    forwarded = pipeline_arguments(merged_options(parser, submit))
    assert "--address" not in forwarded
    assert "--config" not in forwarded
    run_values = merged_options(parser, parser.parse_args(["run", *forwarded]))
    expected = {
        "out": "/shared/r1",
        "storage": "file:///shared/ray",
        "max_sets": 24,
        "finetune_focal_alpha": None,
        "num_workers": 4,
        "use_gpu": True,
        "precision": "bf16-mixed",
        "finetune_max_epochs": 3,
        "num_samples": 2,
    }
    assert {key: run_values[key] for key in expected} == expected


def test_working_dir_must_be_checkout(tmp_path):
    with pytest.raises(UserInputError, match="jobs/pipeline.py not found"):
        submit_pipeline(None, ["--out", "/r1"], tmp_path)


def test_submit_relative_out_is_one_line_error(capsys):
    code = main(["submit", "--address", "http://127.0.0.1:8265", "--out", "runs/r1", "--working-dir", str(ROOT)])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("seqsetvae submit: error: --out runs/r1: a relative path")
    assert error.count("\n") == 1
