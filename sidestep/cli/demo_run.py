"""The steps `sidestep demo` runs after setup; each later feature adds its step here."""

from __future__ import annotations

import torch

from sidestep.cli import output
from sidestep.data import DatasetSpec, collate, load_sample, scan_dataset
from sidestep.models import find_model, load_model, resolve_runtime
from sidestep.objective import flow_matching_loss, noise_like, sampler_for_training
from sidestep.testing.demo import DEMO_MODEL, DemoPaths


def run_demo_job(paths: DemoPaths) -> None:
    entry = find_model(paths.checkpoints, DEMO_MODEL)
    spec = DatasetSpec.from_model_config(entry.config)
    scan = scan_dataset(paths.dataset, spec)
    runtime = resolve_runtime("cpu", "fp32", False)
    loaded = load_model(entry, runtime)
    output.info(f"Loaded {entry.label}: {loaded.num_layers} layers; dataset {len(scan.files)} samples.")
    gen = torch.Generator().manual_seed(0)
    batch = collate([load_sample(scan.files[0], spec)]).to(runtime.device, runtime.dtype)
    t = sampler_for_training(None, loaded.variant).sample(1, gen)
    loss = flow_matching_loss(loaded.transformer, batch, t, noise_like(batch.target_latents, gen))
    output.success(f"Forward+backward check: flow-matching loss {loss.item():.4f}.")
