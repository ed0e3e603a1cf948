"""Shared fixtures: tiny real-architecture checkpoints (both layouts) and tiny real-format datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sidestep.testing.tiny import tiny_config, write_dataset, write_diffusers_checkpoint, write_original_checkpoint

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch):
    """No test reads or writes the developer's real settings."""
    monkeypatch.setenv("SIDESTEP_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
    for var in ("SIDESTEP_CHECKPOINT_DIR", "SIDESTEP_MODEL", "SIDESTEP_DEVICE", "SIDESTEP_PRECISION"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    return tiny_config(num_layers=4, hidden=64)


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory, tiny_cfg) -> Path:
    """A checkpoint root with the same tiny weights in the original and the diffusers layout."""
    root = tmp_path_factory.mktemp("checkpoints")
    write_original_checkpoint(root, tiny_cfg, seed=0)
    write_diffusers_checkpoint(root, tiny_cfg, seed=0)
    return root


@pytest.fixture(scope="session")
def _dataset_template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dataset_template")
    write_dataset(folder, count=6, encoder_width=64, seed=0)
    return folder


@pytest.fixture
def dataset_dir(tmp_path, _dataset_template) -> Path:
    """A fresh copy of the 6-sample tiny dataset that a test may modify."""
    folder = tmp_path / "dataset"
    shutil.copytree(_dataset_template, folder)
    return folder
