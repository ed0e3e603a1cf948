"""The Fisher pass over several processes (torchrun / accelerate launch), equal to the one-process pass.

The batches of a run go round-robin to the processes, W at a time (one round). Every process draws every
batch's timestep and noise from the run's one generator, so batch b gets exactly the draws it gets in one
process. After a round the per-batch Fisher sums Σ||G||² are gathered and folded in batch order, in fp32
as one process folds them, and the convergence tracker is fed batch by batch: every process takes the same
decision, and a run that converges inside a round drops the later batches of that round (their sketch
contribution is undone). The gradient sketches are summed over the processes once, at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sidestep import distributed
from sidestep.analysis.config import AnalysisConfig
from sidestep.analysis.convergence import ConvergenceTracker
from sidestep.analysis.engine import _STOPPED, FisherEngine, Progress, RunInfo, _mix, _Plan, run_subset
from sidestep.analysis.signals import weight_effective_rank
from sidestep.data import DatasetSpec, collate, load_sample
from sidestep.errors import Interrupted
from sidestep.models import LoadedModel
from sidestep.objective import noise_like, sampler_for_focus

__all__ = ["sharded_run", "sum_sketches", "weight_ranks"]


def sharded_run(engine: FisherEngine, config: AnalysisConfig, loaded: LoadedModel, files: list[Path],
                spec: DatasetSpec, run: int, plan: _Plan, report: Callable[[Progress], None],
                should_stop: Callable[[], bool] | None) -> RunInfo:
    """One estimation run, this process computing batches rank, rank + W, ...; see the module docstring."""
    world, rank = distributed.current().world_size, distributed.current().rank
    subset = run_subset(files, config.subset_size(len(files)), config.seed, run)
    gen = torch.Generator().manual_seed(_mix(config.seed, run, 1))
    sampler = sampler_for_focus(config.focus_label, loaded.variant)
    tracker = ConvergenceTracker(config.convergence_patience, config.convergence_threshold)
    total = torch.zeros_like(engine.sq)  # the run's Σ||G||², folded in batch order
    used = 0
    for first in range(0, plan.batches, world):
        stop = should_stop is not None and should_stop()
        engine.reset_fisher()
        before = [z.clone() for z in engine.sketch] if first + rank < plan.batches else None
        if not stop:
            _round(engine, loaded, subset, spec, sampler, gen, first, min(first + world, plan.batches), rank)
        flag = torch.tensor([float(stop)], dtype=engine.sq.dtype, device=engine.sq.device)
        gathered = distributed.all_gather_tensor(torch.cat([engine.sq, flag]))  # world × (modules + 1)
        if bool(gathered[:, -1].any()):
            raise Interrupted(_STOPPED)
        for j in range(min(world, plan.batches - first)):
            total += gathered[j, :-1]
            used, plan.done = first + j + 1, plan.done + 1
            tracker.update(total.cpu().numpy().astype(np.float64) / engine.numel)
            report(Progress("fisher", run + 1, plan.runs, used, plan.batches, plan.done, plan.total,
                            tracker.last, tracker.converged))
            if tracker.converged:
                break
        if tracker.converged:
            if before is not None and first + rank >= used:  # this process's batch came after the stop
                for z, old in zip(engine.sketch, before):
                    z.copy_(old)
            break
    plan.finish_run(used)
    scores = total.cpu().numpy().astype(np.float64) / (engine.numel * used)
    return RunInfo(run + 1, tuple(p.name for p in subset), len(files), used, tracker.last, tracker.converged,
                   tuple(float(x) for x in scores))


def _round(engine: FisherEngine, loaded: LoadedModel, subset: list[Path], spec: DatasetSpec, sampler,
           gen: torch.Generator, first: int, end: int, rank: int) -> None:
    """Draw t and noise for batches first..end-1 (all of them, to keep the stream) and run this process's one."""
    runtime = loaded.runtime
    for b in range(first, end):
        batch = collate([load_sample(subset[b % len(subset)], spec)])
        mine = b == first + rank
        if mine:  # moved before drawing, as one process does, so the noise is cast exactly alike
            batch = batch.to(runtime.device, runtime.dtype)
        t = sampler.sample(1, gen)
        noise = noise_like(batch.target_latents, gen)
        if mine:
            engine.step(batch, t, noise)


def sum_sketches(sketches: Sequence[torch.Tensor]) -> None:
    """Add up every process's gradient sketches, in place (they are sums over batches)."""
    for z in sketches:
        distributed.all_reduce_sum(z)


def weight_ranks(weights: Sequence[torch.Tensor], config: AnalysisConfig, plan: _Plan,
                 report: Callable[[Progress], None], should_stop: Callable[[], bool] | None) -> list[int | None]:
    """The weights' effective ranks, each process taking every W-th weight, shared by one all-reduce."""
    if not config.weight_rank:
        return [None] * len(weights)
    ctx = distributed.current()
    ranks = torch.zeros(len(weights), dtype=torch.float64)
    for i in range(ctx.rank, len(weights), ctx.world_size):
        if should_stop is not None and should_stop():
            raise Interrupted(_STOPPED)
        ranks[i] = weight_effective_rank(weights[i])
    distributed.all_reduce_sum(ranks)
    report(Progress("weight-rank", plan.runs, plan.runs, 0, plan.batches, plan.done, plan.done))
    return [int(r) for r in ranks.tolist()]
