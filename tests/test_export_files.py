"""Exports are files other programs read: world-readable, named after the run, with kohya-style training facts."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from safetensors import safe_open

from sidestep.data import dataset_hash
from sidestep.errors import CheckpointError
from sidestep.fileio import atomic_dir, write_bytes_atomic
from sidestep.models import resolve_runtime
from sidestep.training.config import TrainConfig
from sidestep.training.export import export_adapter, read_lora
from sidestep.training.run import train
from train_support import tiny_setup
from cli_support import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 2-step run into `my-song-lora/` (run.json, final/ with the adapter)."""
    root = tmp_path_factory.mktemp("export")
    choice, dataset = tiny_setup(root, samples=2)
    out = root / "my-song-lora"
    config = TrainConfig(dataset_dir=dataset, output_dir=out, rank=4, max_steps=2, warmup_steps=0, save_every=0)
    train(config, choice, resolve_runtime("cpu", "fp32", False))
    return out, dataset


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def test_every_export_and_the_trained_adapter_are_0644(trained, tmp_path, umask_022):
    out, _ = trained
    assert _mode(out / "final" / "adapter_model.safetensors") == 0o644  # safetensors alone writes 0600
    for fmt in ("comfyui", "diffusers", "peft"):
        path = export_adapter(out, tmp_path / fmt, fmt).path
        files = [path] if path.is_file() else sorted(path.iterdir())
        assert files and all(_mode(f) == 0o644 for f in files), [(f.name, oct(_mode(f))) for f in files]


def test_published_modes_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_bytes_atomic(tmp_path / "private.bin", b"x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inner.txt").write_text("y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.bin") == 0o600
    assert _mode(tmp_path / "folder") == 0o700 and _mode(tmp_path / "folder" / "inner.txt") == 0o600


def test_a_folder_destination_gets_the_run_name_so_comfyui_loras_do_not_collide(trained, tmp_path, monkeypatch,
                                                                                 capsys):
    out, _ = trained
    loras = tmp_path / "ComfyUI" / "models" / "loras"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", "--format", "comfyui", "--json", str(out), str(loras))
    assert code == 0, err
    assert json.loads(stdout)["path"] == str(loras / "my-song-lora.safetensors")
    # a second run files beside it under its own name, not over it
    shutil.copytree(out / "final", tmp_path / "other-run" / "final")
    assert export_adapter(tmp_path / "other-run", loras, "comfyui").path == loras / "other-run.safetensors"
    assert (loras / "my-song-lora.safetensors").is_file()
    with pytest.raises(CheckpointError, match="holds 2 .safetensors files"):
        read_lora(loras)


def test_headers_carry_kohya_training_facts_and_keep_the_loader_metadata(trained, tmp_path):
    out, dataset = trained
    record = json.loads((out / "run.json").read_text())
    ranks = read_lora(out).ranks
    for fmt in ("comfyui", "diffusers"):
        header = _header(export_adapter(out, tmp_path / f"{fmt}.safetensors", fmt).path)
        assert header["ss_base_model_version"] == "acestep_v15_base"
        assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"
        args = json.loads(header["ss_network_args"])
        assert args["modules"] == len(ranks) and args["rank_min"] == args["rank_max"] == 4 and not args["adaptive"]
        assert header["ss_steps"] == str(record.get("steps_done", record.get("steps", record["total_steps"]))) == "2"
        assert header["ss_dataset_hash"] == dataset_hash(dataset)
        assert header["ss_output_name"] == "my-song-lora" and header["ss_learning_rate"] == str(record["config"]["lr"])
        assert all(isinstance(v, str) for v in header.values())
    diffusers_header = _header(tmp_path / "diffusers.safetensors")
    assert "transformer.r" in json.loads(diffusers_header["lora_adapter_metadata"])  # diffusers' alpha source kept


def test_adaptive_ranks_are_summarised_and_survive_a_conversion(tmp_path):
    from test_train_export import _adaptive_plan, _trained
    from sidestep.training import saving

    plan = _adaptive_plan()
    folder = saving.save_adapter_dir(tmp_path / "adaptive" / "final", plan, _trained(plan))
    comfy = export_adapter(folder, tmp_path / "a.safetensors", "comfyui").path
    args = json.loads(_header(comfy)["ss_network_args"])
    assert args["adaptive"] and (args["rank_min"], args["rank_max"], args["modules"]) == (2, 8, 4)
    assert _header(comfy)["ss_output_name"] == "adaptive"  # no run.json: the run folder's name still
    again = export_adapter(comfy, tmp_path / "b.safetensors", "diffusers").path
    assert json.loads(_header(again)["ss_network_args"]) == args
