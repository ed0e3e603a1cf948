"""`--rank-signal probe`: what a short training run actually uses each module for (docs/data-awareness.md).

A flat LoRA probe (rank `probe_rank` on every targetable module) is trained for `probe_steps` steps on the
dataset with the shared flow-matching objective. Then each module's share of the loss the probe removed is
measured on fixed, seeded evaluation inputs by integrated gradients: every adapter gets a strength s, the loss
is followed along the straight path from all adapters off (s = 0) to all on (s = 1), and a module's share is
minus the mean of dL/ds_module at the path's midpoints. The shares add up to the whole fall, and one backward
pass per point and input measures every module at once: on the 2B model that is about twenty times fewer passes
than switching each of the 264 adapters off in turn (the first design, which a GPU run showed took minutes),
and on the planted benchmark it names the planted modules more often and agrees better across seeds.
A module's score is its share per (in + out), the parameter cost of one rank step.

How long to probe is a trade measured on the planted benchmark (docs/data-awareness.md): the default, 40 steps,
is the one whose maps gained most. Which of several interchangeable modules a single probe credits depends on its
seed; `repeats` independent probes (each its own draws and initial directions) are averaged, share by share, for
a map that depends less on the seed, at `repeats` times the cost. A probe whose loss did not fall below the base
model's is retried once at a tenth of the learning rate, so a default rate that diverges on a larger model cannot
silently produce noise.

Under torchrun every process draws the same samples, timesteps and noise from the same seeded generator, but
computes only its round-robin share of each step's samples and of the evaluation passes; one all-reduce per
step (the adapters' gradients) and one per measurement add the shares up. So N processes probe about N times
faster and every process ends with the one-process result, up to float summation order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from sidestep import distributed
from sidestep.analysis.modules import module_shapes
from sidestep.data import DatasetSpec, collate, load_sample
from sidestep.data.dataset import Sample
from sidestep.errors import ConfigError, Interrupted
from sidestep.models import LoadedModel, original_to_diffusers
from sidestep.objective import flow_matching_loss, noise_like, sampler_for_training
from sidestep.seeding import mix_seed

__all__ = ["ProbeSettings", "ProbeResult", "measure_probe", "LR_RETRY_FACTOR"]

_PROBE_STREAM = 0x70726F6265  # "probe": a seed stream of its own, unrelated to the hook analysis
_FLOOR = 1e-12  # a module whose adapter raised the loss is no reason to adapt it; scores stay positive
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
    points: int = 4  # midpoints of the attribution path; 4 give the whole fall to within a few percent
    repeats: int = 1  # independent probes averaged (the first one is the single probe of the same seed)


@dataclass(frozen=True)
class ProbeResult:
    scores: dict[str, float]  # the module's share of the loss fall, per (in + out); original names
    share: dict[str, float]  # the raw share of loss_before - loss_probed (they add up to it); mean over repeats
    loss_before: float  # evaluation loss of the base model (mean over the repeats' evaluation inputs)
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
        self.strength = torch.ones((), device=device)  # 1 = on, 0 = off; in between on the attribution's path
        self.handle = linear.register_forward_hook(self._add)

    def _add(self, _module, inputs, output):
        delta = (inputs[0].float() @ self.a.T) @ self.b.T
        return output + (self.strength * self.scale * delta).to(output.dtype)

    def set_strength(self, value: float, requires_grad: bool = False) -> None:
        self.strength = torch.full((), value, device=self.a.device, requires_grad=requires_grad)


class _Run(NamedTuple):
    """What one probe measured: each module's share of the fall, and the loss without and with the probe."""

    share: dict[str, float]
    before: float
    probed: float

    @property
    def lowered(self) -> bool:
        return math.isfinite(self.probed) and self.probed < self.before


def _summed(values: list[float], device: torch.device) -> list[float]:
    """Each value added up over the processes (one all-reduce; a no-op with one process)."""
    return distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def measure_probe(loaded: LoadedModel, names: list[str], files: list[Path], spec: DatasetSpec, settings: ProbeSettings,
                  seed: int, should_stop: Callable[[], bool] | None = None,
                  on_progress: Callable[[int, int, int], None] | None = None) -> ProbeResult:
    """Train the probe, then attribute its loss fall to the modules. Every process ends with the same result.

    `on_progress(repeat, done, total)` counts, within each of the `settings.repeats` probes (repeat 0-based),
    training steps and then attribution passes (points × evaluation inputs).
    Raises ConfigError when the first probe cannot lower the loss even at the retry's lower learning rate, when a
    later one diverges, or when together they do not lower it. A later probe is trained at the first one's rate
    and counted whatever its own fall: one unlucky probe of K is the noise the average is there to absorb.
    """
    started = time.perf_counter()
    cache: dict[int, Sample] = {}

    def sample(index: int) -> Sample:
        if index not in cache:
            cache[index] = load_sample(files[index], spec)
        return cache[index]

    report = on_progress or (lambda _repeat, _done, _total: None)
    lr, runs = settings.lr, []
    for repeat in range(settings.repeats):
        # the first probe is the single probe of this seed; the others draw streams of their own
        stream = mix_seed(seed, _PROBE_STREAM) if repeat == 0 else mix_seed(seed, _PROBE_STREAM, repeat)

        def run(rate: float, attribute_any_fall: bool = False) -> _Run:
            return _probe_once(loaded, names, sample, len(files), replace(settings, lr=rate), stream, should_stop,
                               lambda done, total: report(repeat, done, total), attribute_any_fall)

        if repeat == 0:
            outcome, lr = _learned(run, lr, settings.lr)
        else:
            # at the first probe's rate, whatever its own fall: one unlucky probe of K is noise the average absorbs
            outcome = run(lr, attribute_any_fall=True)
            if not math.isfinite(outcome.probed):
                raise ConfigError(f"Probe {repeat + 1} of {settings.repeats} diverged at --probe-lr {lr:g}; pass a "
                                  f"lower --probe-lr or fewer --probe-repeats.")
        runs.append(outcome)
    share = {n: sum(r.share[n] for r in runs) / len(runs) for n in names}
    before = sum(r.before for r in runs) / len(runs)
    probed = sum(r.probed for r in runs) / len(runs)
    if not probed < before:
        raise ConfigError(f"The {len(runs)} probes at --probe-lr {lr:g} did not lower the loss on average (loss "
                          f"{before:.4g} before, {probed:.4g} after); pass another --probe-lr or --rank-signal data.")
    shapes = module_shapes(loaded.transformer)
    scores = {n: max(share[n], _FLOOR) / shapes[n].lora_params(1) for n in names}  # per (in + out): one rank step
    return ProbeResult(scores, share, before, probed, settings, time.perf_counter() - started, lr)


def _learned(run: Callable[[float], _Run], lr: float, asked: float) -> tuple[_Run, float]:
    """`run(lr)`, and once more at a tenth of the rate when the probe did not lower the loss: (its outcome, the
    rate it learned at). Raises ConfigError naming `--probe-lr` (`asked`) when it did not learn at either."""
    outcome = run(lr)
    if not outcome.lowered:
        lr *= LR_RETRY_FACTOR
        outcome = run(lr)
    if not outcome.lowered:
        raise ConfigError(f"The probe did not lower the loss at --probe-lr {asked:g} nor at {lr:g} (loss "
                          f"{outcome.before:.4g} before, {outcome.probed:.4g} after); pass another --probe-lr or "
                          f"--rank-signal data.")
    return outcome, lr


def _probe_once(loaded: LoadedModel, names: list[str], sample: Callable[[int], Sample], count: int,
                settings: ProbeSettings, stream: int, should_stop, report: Callable[[int, int], None],
                attribute_any_fall: bool = False) -> _Run:
    """One probe at `settings.lr`, every draw from the generator seeded with `stream`: (each module's share of
    the fall, loss without the probe, loss with it). A probe that did not lower the loss is attributed only
    when `attribute_any_fall` (its shares then add up to a rise); otherwise its shares are empty."""
    model = loaded.transformer
    runtime = loaded.runtime
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(stream)
    was_training = model.training
    model.eval()
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    adapters = {n: _ProbeAdapter(modules[original_to_diffusers(n)], settings.rank, settings.scale, g) for n in names}
    try:
        total = settings.steps + settings.points * min(settings.eval_samples, count)
        _train(model, adapters, sample, count, settings, loaded, g, should_stop, lambda done: report(done, total))
        eval_set = _eval_inputs(sample, count, settings, loaded, g)
        with torch.no_grad():
            for adapter in adapters.values():
                adapter.set_strength(0.0)
            before = _eval_loss(model, eval_set, runtime)
            for adapter in adapters.values():
                adapter.set_strength(1.0)
            probed = _eval_loss(model, eval_set, runtime)
        share = {}
        if math.isfinite(probed) and (probed < before or attribute_any_fall):
            share = _path_shares(adapters, model, eval_set, runtime, settings.points, should_stop,
                                 lambda done: report(settings.steps + done, total))
    finally:
        for adapter in adapters.values():
            adapter.handle.remove()
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return _Run(share, before, probed)


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
        for j in range(settings.batch):
            batch = collate([sample(int(torch.randint(count, (1,), generator=g)))])
            t = sampler.sample(1, g)
            # every process draws (float32 on the CPU, as noise_like always does), to keep the generators in step
            noise = noise_like(batch.target_latents.float(), g)
            if distributed.owns(j):
                batch = batch.to(runtime.device, runtime.dtype)
                loss = flow_matching_loss(model, batch, t, noise.to(runtime.device, runtime.dtype))
                (loss / settings.batch).backward()
        distributed.sum_gradients(params)
        optimizer.step()


def _path_shares(adapters: dict[str, _ProbeAdapter], model, eval_set: list[_EvalItem], runtime, points: int,
                 should_stop, report: Callable[[int], None]) -> dict[str, float]:
    """Each module's share of the loss fall by integrated gradients (midpoint rule on the path s: 0 -> 1 of every
    adapter's strength at once). One draw per backward pass keeps the memory of a batch-1 training step."""
    for adapter in adapters.values():
        adapter.a.requires_grad_(False)
        adapter.b.requires_grad_(False)
    draws = sum(len(item.t) for item in eval_set)
    slope = dict.fromkeys(adapters, 0.0)
    for k in range(points):
        for adapter in adapters.values():
            adapter.set_strength((k + 0.5) / points, requires_grad=True)
        index = 0  # of the draw, over the whole evaluation set: what is dealt out to the processes
        for done, item in enumerate(eval_set, start=k * len(eval_set) + 1):
            if should_stop is not None and should_stop():
                raise Interrupted("Analysis interrupted; nothing was written.")
            batch = collate([item.sample]).to(runtime.device, runtime.dtype)
            for j in range(len(item.t)):
                if distributed.owns(index):
                    noise = item.noise[j : j + 1].to(runtime.device, runtime.dtype)
                    (flow_matching_loss(model, batch, item.t[j : j + 1], noise) / draws).backward()
                index += 1
            report(done)
        for name, adapter in adapters.items():
            if adapter.strength.grad is not None:  # None: this process had no draw at this point
                slope[name] += float(adapter.strength.grad) / points
    for adapter in adapters.values():
        adapter.set_strength(1.0)
    total = _summed(list(slope.values()), runtime.device)
    return {name: -value for name, value in zip(slope, total)}  # dL/ds < 0: the module's adapter lowers the loss


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
    """Mean loss over the evaluation inputs, each process computing its round-robin share of the samples."""
    total = 0.0
    for item in distributed.shard(items):
        batch = collate([item.sample] * len(item.t)).to(runtime.device, runtime.dtype)
        noise = item.noise.to(runtime.device, runtime.dtype)
        total += float(flow_matching_loss(model, batch, item.t, noise))
    return _summed([total], runtime.device)[0] / len(items)
