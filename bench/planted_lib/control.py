"""The differential control's dataset: samples drawn from the planted base model itself (Euler ODE, t: 1 -> 0).

A map that measures what the *data* asks for must find much less concentrated need here than on the planted task
(not zero: ODE samples are not exactly the distribution the model was trained on)."""

from __future__ import annotations

from dataclasses import replace

import torch

from sidestep.data.dataset import Sample, collate


@torch.no_grad()
def own_samples(model: torch.nn.Module, conditions: list[Sample], steps: int, seed: int) -> list[Sample]:
    """One sample per condition: x_1 = noise, x_{t−dt} = x_t − dt · v(x_t, t) (x_t = t·noise + (1−t)·x0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for cond in conditions:
        batch = collate([cond])
        x = torch.randn(batch.target_latents.shape, generator=g)
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for t0, t1 in zip(ts[:-1], ts[1:]):
            t = t0.view(1)
            v = model(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=batch.encoder_hidden_states,
                      context_latents=batch.context_latents).sample
            x = x - (t0 - t1) * v
        out.append(replace(cond, name=f"own_{cond.name}", target_latents=x[0].float()))
    return out
