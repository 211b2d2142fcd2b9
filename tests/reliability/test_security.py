"""Weights that do not match the model, planted pickles, and the services of the local Ray instance."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from seqsetvae.cli import main
from seqsetvae.model.core import SeqSetVAE


def finetune_args(data: Path, checkpoint: Path, out: Path) -> list[str]:
    return ["finetune", "--data", str(data), "--pretrained-ckpt", str(checkpoint), "--out", str(out), "--max-epochs", "1"]


def error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"seqsetvae {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def rewritten(source: Path, target: Path, change) -> Path:
    """Write `source`'s weights-only content with `change` applied to its state dict."""
    content = torch.load(source, weights_only=True)
    content["state_dict"] = change(dict(content["state_dict"]))
    torch.save(content, target)
    return target


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.model."])
def test_wrapper_prefixes_are_mapped(small_meds, tiny_pretrained, tmp_path, prefix):
    checkpoint = rewritten(tiny_pretrained, tmp_path / "wrapped.pt", lambda state: {prefix + k: v for k, v in state.items()})
    assert main(finetune_args(small_meds, checkpoint, tmp_path / "ft")) == 0
    assert (tmp_path / "ft" / "export" / "encoder.safetensors").is_file()


def test_lightning_checkpoint_is_mapped(small_meds, tiny_pretrained, tmp_path):
    # The Lightning checkpoint of the fixture names every weight with the module's `model.` prefix.
    lightning_ckpt = tiny_pretrained.parent / "last.ckpt"
    assert any(key.startswith("model.") for key in torch.load(lightning_ckpt, weights_only=True)["state_dict"])
    assert main(finetune_args(small_meds, lightning_ckpt, tmp_path / "ft")) == 0


def first_encoder_key(state: dict) -> str:
    return next(key for key in state if key.startswith(SeqSetVAE.encoder_state_prefixes))


def test_missing_encoder_key_is_named(small_meds, tiny_pretrained, tmp_path, capsys):
    state = torch.load(tiny_pretrained, weights_only=True)["state_dict"]
    removed = first_encoder_key(state)
    checkpoint = rewritten(tiny_pretrained, tmp_path / "cut.pt", lambda s: {k: v for k, v in s.items() if k != removed})
    assert main(finetune_args(small_meds, checkpoint, tmp_path / "ft")) == 2
    line = error_line(capsys.readouterr().err, "finetune")
    assert "encoder keys missing from the pretrained weights" in line
    assert removed in line
    assert not (tmp_path / "ft" / "export").exists()


def test_wrong_shape_is_named(small_meds, tiny_pretrained, tmp_path, capsys):
    state = torch.load(tiny_pretrained, weights_only=True)["state_dict"]
    key = next(k for k in state if k.startswith(SeqSetVAE.encoder_state_prefixes) and state[k].dim() == 2)

    def widen(s):
        s[key] = torch.zeros(s[key].shape[0] + 3, s[key].shape[1])
        return s

    checkpoint = rewritten(tiny_pretrained, tmp_path / "wide.pt", widen)
    assert main(finetune_args(small_meds, checkpoint, tmp_path / "ft")) == 2
    line = error_line(capsys.readouterr().err, "finetune")
    assert f"{key} (expected {tuple(state[key].shape)}" in line


class Planted:
    """An object whose unpickling creates a directory: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant_pickle(path: Path, marker: Path, torch_format: bool) -> Path:
    content = {"state_dict": {}, "hyper_parameters": {}, "payload": Planted(marker)}
    if torch_format:
        torch.save(content, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(content, handle)
    return path


def test_planted_torch_file_is_rejected(small_meds, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    planted = plant_pickle(tmp_path / "planted.pt", marker, torch_format=True)
    assert main(finetune_args(small_meds, planted, tmp_path / "ft")) == 2
    line = error_line(capsys.readouterr().err, "finetune")
    assert str(planted) in line
    assert "rejected, the file contains objects other than weights" in line
    assert not marker.exists()


def test_planted_pickle_is_rejected_by_the_command(small_meds, tmp_path):
    marker = tmp_path / "code-ran"
    planted = plant_pickle(tmp_path / "planted.pt", marker, torch_format=False)
    finished = subprocess.run(
        [sys.executable, "-m", "seqsetvae.cli", *finetune_args(small_meds, planted, tmp_path / "ft")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    line = error_line(finished.stderr, "finetune")
    assert str(planted) in line
    assert "rejected, the file contains objects other than weights" in line
    assert not marker.exists()


def test_planted_export_file_is_rejected(small_meds, tiny_export, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    marker = tmp_path / "code-ran"
    plant_pickle(export / "encoder.safetensors", marker, torch_format=False)
    assert main(["evaluate", "--model", str(export), "--data", str(small_meds), "--out", str(tmp_path / "eval")]) == 2
    line = error_line(capsys.readouterr().err, "evaluate")
    assert str(export / "encoder.safetensors") in line
    assert "export the model again" in line
    assert not marker.exists()


def test_corrupt_export_config_is_named(small_meds, tiny_export, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    (export / "config.json").write_text('{"model_config": {"d_model": 16')
    assert main(["evaluate", "--model", str(export), "--data", str(small_meds), "--out", str(tmp_path / "eval")]) == 2
    assert str(export / "config.json") in error_line(capsys.readouterr().err, "evaluate")


def network_addresses() -> list[str]:
    """Return the IPv4 addresses of this machine's interfaces, loopback left out."""
    return [
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and not address.address.startswith("127.")
    ]


def test_dashboard_and_job_server_on_loopback(ray_local):
    from ray.job_submission import JobSubmissionClient

    # NOTE: Ray 2.60 has no public accessor for the dashboard address of the running instance.
    host, port = ray_local._private.worker._global_node.webui_url.split(":")
    assert host == "127.0.0.1"
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    # The job server responds on the loopback address...
    assert isinstance(JobSubmissionClient(f"http://127.0.0.1:{port}").list_jobs(), list)
    # ...and on no other address of this machine.
    addresses = network_addresses()
    if not addresses:
        pytest.skip("this machine has no network address besides loopback")
    for address in addresses:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, int(port)), timeout=5)
        with pytest.raises(ConnectionError):
            JobSubmissionClient(f"http://{address}:{port}")
