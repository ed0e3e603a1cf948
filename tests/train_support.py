"""Helpers shared by the training tests: a tiny checkpoint, a model choice, an original-named decoder."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sidestep.models import find_model
from sidestep.models.select import ModelChoice
from sidestep.testing.tiny import tiny_config, write_dataset, write_original_checkpoint

_ORIGINAL = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj"}


def tiny_setup(root: Path, num_layers: int = 2, hidden: int = 32, samples: int = 4,
               folder: str = "acestep-v15-base", **overrides) -> tuple[ModelChoice, Path]:
    """A tiny original-layout checkpoint and a matching dataset under `root`."""
    cfg = tiny_config(num_layers=num_layers, hidden=hidden, **overrides)
    write_original_checkpoint(root / "checkpoints", cfg, seed=0, folder=folder)
    dataset = root / "dataset"
    write_dataset(dataset, count=samples, encoder_width=hidden, seed=0, lengths=(16, 32), encoder_length=8)
    name = folder.removeprefix("acestep-v15-")
    return ModelChoice(find_model(root / "checkpoints", name), root / "checkpoints", {}), dataset


def original_named(transformer: torch.nn.Module) -> torch.nn.Module:
    """A copy whose attention projections carry the ORIGINAL names (q_proj/k_proj/v_proj/o_proj).

    The diffusers forward still works: to_q/... become properties reading the renamed submodules.
    """
    model = copy.deepcopy(transformer)
    for module in list(model.modules()):
        if not hasattr(module, "to_q"):
            continue
        mods = module._modules
        for new, old in _ORIGINAL.items():
            mods[old] = mods.pop(new)
        out = mods.pop("to_out")
        mods["o_proj"], mods["out_dropout"] = out[0], out[1]
        props = {new: property(lambda self, old=old: self._modules[old]) for new, old in _ORIGINAL.items()}
        props["to_out"] = property(lambda self: [self._modules["o_proj"], self._modules["out_dropout"]])
        module.__class__ = type("Original" + type(module).__name__, (type(module),), props)
    return model


def forward(model: torch.nn.Module, seed: int = 0, frames: int = 12, width: int = 32) -> torch.Tensor:
    """One deterministic forward pass of a tiny DiT."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, 64, generator=gen)
    ctx = torch.randn(1, frames, 128, generator=gen)
    enc = torch.randn(1, 6, width, generator=gen)
    t = torch.tensor([0.7])
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=enc, context_latents=ctx).sample
