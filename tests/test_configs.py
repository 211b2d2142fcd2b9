"""The configurations shipped in configs/ parse as `seqsetvae run` options."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seqsetvae.cli import build_parser, merged_options

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_lists_physionet2012():
    assert [path.name for path in CONFIGS] == ["physionet2012.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_keys_reach_run_options(path):
    parser = build_parser()
    values = merged_options(parser, parser.parse_args(["run", "--config", str(path), "--out", "runs/x"]))
    written = yaml.safe_load(path.read_text())
    assert written
    for key, value in written.items():
        assert values[key] == value, key


def test_command_line_overrides_config():
    parser = build_parser()
    path = CONFIGS[0]
    args = parser.parse_args(["run", "--config", str(path), "--out", "runs/x", "--max-epochs", "1"])
    assert merged_options(parser, args)["max_epochs"] == 1
