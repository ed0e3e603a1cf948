"""Candidate signal measured on the planted task (not shipped): a short flat LoRA probe, then per-module ablation.

Train a rank-`rank` LoRA on every targetable module for `steps` steps, then switch each module's probe adapter
off in turn and measure how much the loss on a fixed evaluation set rises. A module whose share of the probe's
fix cannot be taken over by the others scores high. Scores are per (in + out), the cost of one rank step.
The probe is charged as its training steps plus one evaluation pass per module.
"""

from __future__ import annotations

import copy
import time

import torch

from sidestep.analysis.modules import targetable_modules
from sidestep.data.dataset import Sample, collate
from sidestep.models import original_to_diffusers
from sidestep.objective import flow_matching_loss, noise_like, sampler_for_training

from quality_lib.evaluate import eval_loss, make_eval_set


class _ProbeLoRA:
    def __init__(self, linear: torch.nn.Linear, rank: int, g: torch.Generator):
        self.a = (torch.randn(rank, linear.in_features, generator=g) / linear.in_features**0.5).requires_grad_(True)
        self.b = torch.zeros(linear.out_features, rank, requires_grad=True)
        self.on = True
        self.handle = linear.register_forward_hook(self._add)

    def _add(self, _module, inputs, output):
        return output + 2.0 * (inputs[0] @ self.a.T) @ self.b.T if self.on else output


def probe_ablation_scores(model: torch.nn.Module, samples: list[Sample], num_layers: int, variant, seed: int,
                          steps: int = 40, rank: int = 8, lr: float = 1e-2, batch_size: int = 4) -> tuple[dict[str, float], float]:
    started = time.perf_counter()
    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    names = targetable_modules(num_layers)
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(90_000 + seed)
    probes = {n: _ProbeLoRA(modules[original_to_diffusers(n)], rank, g) for n in names}
    optimizer = torch.optim.Adam([p for pr in probes.values() for p in (pr.a, pr.b)], lr=lr)
    sampler = sampler_for_training(None, variant)
    for _ in range(steps):
        idx = torch.randint(len(samples), (batch_size,), generator=g).tolist()
        batch = collate([samples[i] for i in idx])
        loss = flow_matching_loss(model, batch, sampler.sample(batch_size, g), noise_like(batch.target_latents, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe_set = make_eval_set(samples[:12], 4, variant, 95_000 + seed)
    full = eval_loss(model, probe_set)[0]
    scores = {}
    for n, pr in probes.items():
        pr.on = False
        linear = modules[original_to_diffusers(n)]
        # an ablation that helps (negative) is no reason to adapt the module: floor at a tiny positive score
        scores[n] = max(eval_loss(model, probe_set)[0] - full, 1e-12) / (linear.in_features + linear.out_features)
        pr.on = True
    for pr in probes.values():
        pr.handle.remove()
    return scores, time.perf_counter() - started
