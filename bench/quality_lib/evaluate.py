"""Held-out flow-matching loss at FIXED timesteps and noise, identical for every arm (so differences are paired)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sidestep.data.dataset import Sample, collate
from sidestep.models.variants import Variant
from sidestep.objective import flow_matching_loss


@dataclass(frozen=True)
class EvalSet:
    """Samples with K fixed (t, noise) draws each: t at K stratified quantiles of the training distribution."""

    samples: tuple[Sample, ...]
    t: torch.Tensor  # [K]
    noise: tuple[torch.Tensor, ...]  # per sample, [K, T, 64]

    @property
    def draws(self) -> int:
        return int(self.t.shape[0])


def make_eval_set(samples: list[Sample], draws: int, variant: Variant, seed: int) -> EvalSet:
    q = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    t = torch.sigmoid(variant.timestep_mu + variant.timestep_sigma * torch.special.ndtri(q)).float()
    g = torch.Generator().manual_seed(seed)
    noise = tuple(torch.randn(draws, s.length, s.target_latents.shape[1], generator=g) for s in samples)
    return EvalSet(tuple(samples), t, noise)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: EvalSet) -> tuple[float, list[float]]:
    """Mean loss over samples × draws, and the mean per draw (per timestep quantile, low t first)."""
    model.eval()
    param = next(model.parameters())
    per_t = torch.zeros(data.draws, dtype=torch.float64)
    for sample, noise in zip(data.samples, data.noise):
        batch = collate([sample] * data.draws).to(param.device, param.dtype)
        loss = flow_matching_loss(model, batch, data.t, noise.to(param.device, param.dtype), reduction="none")
        per_t += loss.detach().double().cpu()
    per_t /= len(data.samples)
    return float(per_t.mean()), [float(x) for x in per_t]
