"""`--rank-signal probe`: what a short training run actually uses each module for (docs/data-awareness.md).

A flat LoRA probe (rank `probe_rank` on every targetable module) is trained for `probe_steps` steps on the
dataset with the shared flow-matching objective; then each module's probe adapter is switched off in turn and
the rise of the loss on fixed, seeded evaluation inputs is measured. A module whose share of the fix the other
modules cannot take over scores high; its score is that rise per (in + out), the parameter cost of one rank
step. On the planted benchmark this is the only signal that finds where the data needs change (gradients at the
base spread a module's error over its neighbours); it costs `probe_steps` training steps plus one evaluation
pass per module, several times the hook analysis.

How long to probe is a trade measured on the planted benchmark (docs/data-awareness.md): a longer probe lets
the fix move from stand-in modules (gate and up of one MLP, v and o of one attention) to the module that can
repair the change fully, so it names the planted modules more often, but the maps it sizes gained less there;
the default, 40 steps, is the one whose maps gained most. A probe whose loss did not fall below the base
model's is retried once at a tenth of the learning rate, so a default rate that diverges on a larger model
cannot silently produce noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from sidestep.data import DatasetSpec, collate, load_sample
from sidestep.data.dataset import Sample
from sidestep.errors import ConfigError, Interrupted
from sidestep.models import LoadedModel, original_to_diffusers
from sidestep.objective import flow_matching_loss, noise_like, sampler_for_training
from sidestep.seeding import mix_seed

__all__ = ["ProbeSettings", "ProbeResult", "measure_probe", "LR_RETRY_FACTOR"]

_PROBE_STREAM = 0x70726F6265  # "probe": a seed stream of its own, unrelated to the hook analysis
_FLOOR = 1e-12  # an ablation that lowers the loss is no reason to adapt a module; scores stay positive
LR_RETRY_FACTOR = 0.1  # a probe that did not learn is retried once at this multiple of its learning rate


@dataclass(frozen=True)
class ProbeSettings:
    steps: int
    rank: int
    lr: float
    batch: int = 4  # samples per optimizer step (accumulated one at a time: memory of batch 1)
    eval_samples: int = 8
    eval_draws: int = 4  # fixed timesteps per evaluation sample
    scale: float = 2.0  # alpha / rank of the probe adapters


@dataclass(frozen=True)
class ProbeResult:
    scores: dict[str, float]  # loss rise when the module's probe is off, per (in + out); original names
    rise: dict[str, float]  # the raw loss rise
    loss_before: float  # evaluation loss of the base model
    loss_probed: float  # with every probe adapter on
    settings: ProbeSettings
    seconds: float
    lr_used: float  # settings.lr, or the retry's lower rate when the first probe did not learn


class _ProbeAdapter:
    """y += scale · B A x on one linear layer, A random and B zero at the start (the probe starts as a no-op)."""

    def __init__(self, linear: torch.nn.Linear, rank: int, scale: float, g: torch.Generator):
        device = linear.weight.device
        self.a = (torch.randn(rank, linear.in_features, generator=g) / math.sqrt(linear.in_features)).to(device)
        self.a.requires_grad_(True)
        self.b = torch.zeros(linear.out_features, rank, device=device, requires_grad=True)
        self.scale = scale
        self.on = True
        self.handle = linear.register_forward_hook(self._add)

    def _add(self, _module, inputs, output):
        if not self.on:
            return output
        delta = (inputs[0].float() @ self.a.T) @ self.b.T
        return output + (self.scale * delta).to(output.dtype)


def measure_probe(loaded: LoadedModel, names: list[str], files: list[Path], spec: DatasetSpec, settings: ProbeSettings,
                  seed: int, should_stop: Callable[[], bool] | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> ProbeResult:
    """Train the probe, then ablate it module by module. Every process computes the same result (same seed).

    `on_progress(done, total)` counts training steps and then ablated modules. Raises ConfigError when the probe
    cannot lower the loss even at the retry's lower learning rate.
    """
    started = time.perf_counter()
    cache: dict[int, Sample] = {}

    def sample(index: int) -> Sample:
        if index not in cache:
            cache[index] = load_sample(files[index], spec)
        return cache[index]

    lr = settings.lr
    for attempt in range(2):
        rise, before, probed = _probe_once(loaded, names, sample, len(files), replace(settings, lr=lr), seed,
                                           should_stop, on_progress or (lambda _done, _total: None))
        if math.isfinite(probed) and probed < before:
            break
        if attempt == 0:
            lr *= LR_RETRY_FACTOR
    else:
        raise ConfigError(f"The probe did not lower the loss at --probe-lr {settings.lr:g} nor at {lr:g} "
                          f"(loss {before:.4g} before, {probed:.4g} after); pass another --probe-lr or --rank-signal data.")
    costs = _costs(loaded, names)
    scores = {n: max(rise[n], _FLOOR) / costs[n] for n in names}
    return ProbeResult(scores, rise, before, probed, settings, time.perf_counter() - started, lr)


def _costs(loaded: LoadedModel, names: list[str]) -> dict[str, int]:
    """The parameter cost of one rank step of each module: in + out."""
    modules = dict(loaded.transformer.named_modules())
    linears = {n: modules[original_to_diffusers(n)] for n in names}
    return {n: linear.in_features + linear.out_features for n, linear in linears.items()}


def _probe_once(loaded: LoadedModel, names: list[str], sample: Callable[[int], Sample], count: int,
                settings: ProbeSettings, seed: int, should_stop, report: Callable[[int, int], None]
                ) -> tuple[dict[str, float], float, float]:
    """One probe at `settings.lr`: (loss rise per module, loss without the probe, loss with it)."""
    model = loaded.transformer
    runtime = loaded.runtime
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(mix_seed(seed, _PROBE_STREAM))
    was_training = model.training
    model.eval()
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    adapters = {n: _ProbeAdapter(modules[original_to_diffusers(n)], settings.rank, settings.scale, g) for n in names}
    try:
        total = settings.steps + len(names)
        _train(model, adapters, sample, count, settings, loaded, g, should_stop, lambda done: report(done, total))
        eval_set = _eval_inputs(sample, count, settings, loaded, g)
        with torch.no_grad():
            for adapter in adapters.values():
                adapter.on = False
            before = _eval_loss(model, eval_set, runtime)
            for adapter in adapters.values():
                adapter.on = True
            probed = _eval_loss(model, eval_set, runtime)
            rise = {}
            if math.isfinite(probed) and probed < before:  # a probe that learned nothing is not worth ablating
                for done, (name, adapter) in enumerate(adapters.items(), start=settings.steps + 1):
                    if should_stop is not None and should_stop():
                        raise Interrupted("Analysis interrupted; nothing was written.")
                    adapter.on = False
                    rise[name] = _eval_loss(model, eval_set, runtime) - probed
                    adapter.on = True
                    report(done, total)
    finally:
        for adapter in adapters.values():
            adapter.handle.remove()
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return rise, before, probed


def _train(model, adapters, sample, count: int, settings: ProbeSettings, loaded: LoadedModel, g: torch.Generator,
           should_stop, report: Callable[[int], None]) -> None:
    params = [p for a in adapters.values() for p in (a.a, a.b)]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    sampler = sampler_for_training(None, loaded.variant)
    runtime = loaded.runtime
    for step in range(settings.steps):
        if should_stop is not None and should_stop():
            raise Interrupted("Analysis interrupted; nothing was written.")
        report(step)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(settings.batch):
            batch = collate([sample(int(torch.randint(count, (1,), generator=g)))]).to(runtime.device, runtime.dtype)
            t = sampler.sample(1, g)
            loss = flow_matching_loss(model, batch, t, noise_like(batch.target_latents, g))
            (loss / settings.batch).backward()
        optimizer.step()


@dataclass(frozen=True)
class _EvalItem:
    sample: Sample
    t: torch.Tensor
    noise: torch.Tensor


def _eval_inputs(sample, count: int, settings: ProbeSettings, loaded: LoadedModel, g: torch.Generator) -> list[_EvalItem]:
    """Fixed inputs: `eval_samples` samples, each at `eval_draws` timestep quantiles with seeded noise."""
    variant = loaded.variant
    picks = torch.randperm(count, generator=g)[: min(settings.eval_samples, count)].tolist()
    q = (torch.arange(settings.eval_draws, dtype=torch.float64) + 0.5) / settings.eval_draws
    t = torch.sigmoid(variant.timestep_mu + variant.timestep_sigma * torch.special.ndtri(q)).float()
    items = []
    for index in picks:
        s = sample(index)
        noise = torch.randn(settings.eval_draws, s.length, s.target_latents.shape[1], generator=g)
        items.append(_EvalItem(s, t, noise))
    return items


def _eval_loss(model, items: list[_EvalItem], runtime) -> float:
    total = 0.0
    for item in items:
        batch = collate([item.sample] * len(item.t)).to(runtime.device, runtime.dtype)
        noise = item.noise.to(runtime.device, runtime.dtype)
        total += float(flow_matching_loss(model, batch, item.t, noise))
    return total / len(items)
