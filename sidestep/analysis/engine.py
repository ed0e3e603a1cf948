"""The Fisher engine: ONE forward+backward per analysed batch for every target module together.

Each target weight gets a post-accumulate-grad hook that folds its gradient into per-module device
accumulators and frees it at once, so only one or two weight gradients exist at any moment
(docs/algorithm.md §1). Per module m and batch i, with G = dL_i/dW_m (out × in) and Z_i = Gᵀ Ψ:
  - sq[m]   += ||G||_F^2          (Fisher score F_m = sq[m] / (numel · batches))
  - Z[m]    += Z_i                (input-side sketch, in × k; Ψ seeded Gaussian out × k scaled 1/√k)
  - zsq[m]  += ||Z_i||_F^2        (with ||Z||², an unbiased estimate of the need ||E G||², see `need`)
  - gram[m] += Z_iᵀ Z_i           (k × k; with ZᵀZ, the unbiased spectrum of the need)
Nothing syncs with the host inside the loop except one copy of `sq` per convergence check.

One loop serves one process and many (torchrun / accelerate launch): the batches of a run go round-robin to
the processes, W at a time; every process draws every batch's timestep and noise from the run's one
generator, so batch b gets exactly the draws it gets alone. After each round the per-batch Fisher sums are
gathered and folded in batch order, so every process takes the same convergence decision; the other
accumulators are sums over batches and are added up once, at the end. For one process every collective
is a no-op and a round is one batch.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sidestep import distributed
from sidestep.analysis.config import AnalysisConfig
from sidestep.analysis.convergence import ConvergenceTracker, mean_pairwise_spearman
from sidestep.analysis.modules import ModuleShape, targetable_modules
from sidestep.analysis.signals import NeedEstimate, energy_rank, need_estimate, singular_values, weight_effective_rank
from sidestep.analysis.probe import ProbeResult
from sidestep.data import Batch, DatasetSpec, collate, load_sample
from sidestep.errors import Interrupted, SidestepError, is_out_of_memory
from sidestep.models import LoadedModel, original_to_diffusers
from sidestep.objective import flow_matching_loss, noise_like, sampler_for_focus
from sidestep.seeding import mix_seed

__all__ = ["AnalysisResult", "FisherEngine", "ModuleStats", "Progress", "RunInfo", "run_analysis", "run_subset"]

_STOPPED = "Analysis stopped before it finished; nothing was written."


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress report: `done` of `total` batches (total shrinks when a run converges early)."""

    phase: str  # "fisher" while batches run, "weight-rank" during the SVDs, "done" at the end; the probe's
    # "probe" (training steps) and "probe-attribution" (its attribution passes) come after, with --rank-signal probe
    run: int  # 1-based
    runs: int
    batch: int  # batches done in this run
    batches: int  # planned batches of this run
    done: int
    total: int
    spearman: float | None = None  # latest convergence correlation of this run
    converged: bool = False


@dataclass(frozen=True, slots=True)
class ModuleStats:
    """Everything measured for one target module (original name)."""

    name: str
    in_features: int
    out_features: int
    fisher: float  # mean over runs of Σ||G||² / (numel · batches)
    fisher_std: float  # sample std over runs (0 with one run)
    data_rank: int  # singular values of the summed sketch holding `data_rank_energy` of its energy
    grad_energy: float  # ≈ |mean G|² / numel, from the sketch's Frobenius norm (biased up by the noise)
    weight_rank: int | None  # effective rank of the pretrained weight, None when not measured
    need: NeedEstimate | None = None  # unbiased need spectrum from the per-batch sketches (None with sketch_k 0)

    @property
    def shape(self) -> ModuleShape:
        return ModuleShape(self.name, self.in_features, self.out_features)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One estimation run: which samples it drew from, batches used, how its ranking settled."""

    run: int  # 1-based
    files: tuple[str, ...]
    total_count: int
    batches: int
    final_spearman: float | None
    converged: bool
    fisher: tuple[float, ...]  # this run's Fisher scores, in module order


@dataclass(frozen=True)
class AnalysisResult:
    """The measured statistics of every targetable module, plus how they were obtained."""

    modules: tuple[ModuleStats, ...]  # targetable order (layer-major)
    runs: tuple[RunInfo, ...]
    cross_run_spearman: float | None
    sketch_k: int
    seconds: float
    sketches: dict[str, torch.Tensor] | None = None  # Z_m (in × k, fp32, CPU) when keep_sketches or write_init
    probe: ProbeResult | None = None  # --rank-signal probe: each module's share of the probe's loss fall

    @property
    def total_batches(self) -> int:
        return sum(run.batches for run in self.runs)

    @property
    def by_name(self) -> dict[str, ModuleStats]:
        return {m.name: m for m in self.modules}


class FisherEngine:
    """Context manager: while open, the target weights require grad and fold their gradients into accumulators.

    Args:
        transformer: the frozen DiT (diffusers `AceStepTransformer1DModel`).
        names: target modules, original names (`layers.3.self_attn.q_proj`).
        sketch_k: sketch width, capped per module at min(in, out); 0 measures Fisher scores only.
        seed: seeds the sketch matrices Ψ (drawn on the CPU, so CPU and GPU agree).
    """

    def __init__(self, transformer: torch.nn.Module, names: Sequence[str], sketch_k: int, seed: int) -> None:
        self.transformer = transformer
        self.names = list(names)
        modules = dict(transformer.named_modules())
        self.weights = [modules[original_to_diffusers(name)].weight for name in self.names]
        device = self.weights[0].device
        self.numel = np.array([w.numel() for w in self.weights], dtype=np.float64)
        self.ks = [min(sketch_k, *w.shape) for w in self.weights]
        self.sq = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        self.sketch = [torch.zeros(w.shape[1], k, dtype=torch.float32, device=device) for w, k in zip(self.weights, self.ks)]
        self.zsq = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        self.gram = [torch.zeros(k, k, dtype=torch.float32, device=device) for k in self.ks]
        # Ψ is shared by modules of the same (out, k): each module's sketch is still a valid random sketch.
        # It is kept in the weights' dtype so a bf16 gradient is never copied to fp32 in full.
        self._psi: dict[tuple[int, int], torch.Tensor] = {}
        for w, k in zip(self.weights, self.ks):
            key = (w.shape[0], k)
            if key not in self._psi:
                gen = torch.Generator().manual_seed(mix_seed(seed, *key))
                self._psi[key] = (torch.randn(key, generator=gen) / max(k, 1) ** 0.5).to(device, w.dtype)
        self.forward_passes = 0
        self._handles: list = []
        self._saved: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> "FisherEngine":
        self._saved = [(p, p.requires_grad) for p in self.transformer.parameters()]
        try:
            self.transformer.requires_grad_(False)
            for i, weight in enumerate(self.weights):
                weight.requires_grad_(True)
                self._handles.append(weight.register_post_accumulate_grad_hook(self._hook(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for weight in self.weights:
            weight.grad = None
        for param, flag in self._saved:
            param.requires_grad_(flag)
        self._saved.clear()

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        sq, zsq, sketch, gram = self.sq, self.zsq, self.sketch[i], self.gram[i]
        psi = self._psi[(self.weights[i].shape[0], self.ks[i])]

        def fold(param: torch.Tensor) -> None:
            grad = param.grad.detach()
            # No full-size temporary: the norm upcasts inside its kernel (CUDA) and the sketch is only in × k.
            sq[i].add_(torch.linalg.vector_norm(grad, dtype=torch.float32).square())
            if sketch.shape[1]:  # sketch_k = 0: Fisher scores only (the bench's no-sketch arm)
                z = (grad.t() @ psi).float()  # Z_i = Gᵀ Ψ: (in × out) @ (out × k)
                sketch.add_(z)
                zsq[i].add_(z.square().sum())
                gram.addmm_(z.t(), z)  # k × k, a few % of the sketch product's FLOPs
            param.grad = None  # free it now: only one or two weight gradients ever exist

        return fold

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the batch-summed accumulators, to undo a batch computed past a convergence stop."""
        return [self.zsq.clone(), *(z.clone() for z in self.sketch), *(g.clone() for g in self.gram)]

    def restore(self, saved: Sequence[torch.Tensor]) -> None:
        for mine, old in zip([self.zsq, *self.sketch, *self.gram], saved):
            mine.copy_(old)

    def sum_over_processes(self) -> None:
        """Add up every process's batch-summed accumulators, in place (no-op for one process)."""
        for tensor in (self.zsq, *self.sketch, *self.gram):
            distributed.all_reduce_sum(tensor)

    def psi(self, i: int) -> torch.Tensor:
        """The sketch matrix Ψ (out × k, in the weights' dtype) of target `i`."""
        return self._psi[(self.weights[i].shape[0], self.ks[i])]

    def step(self, batch: Batch, t: torch.Tensor, noise: torch.Tensor) -> None:
        """One forward+backward of the flow-matching loss; the hooks do the accounting."""
        self.forward_passes += 1
        loss = flow_matching_loss(self.transformer, batch, t, noise)
        loss.backward()

    def fisher_sums(self) -> np.ndarray:
        """Σ||G||² per module so far in this run, copied to the host (the one sync per check)."""
        return self.sq.cpu().numpy().astype(np.float64)

    def reset_fisher(self) -> None:
        self.sq.zero_()


def run_analysis(
    config: AnalysisConfig,
    loaded: LoadedModel,
    files: Sequence[Path],
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AnalysisResult:
    """Estimate every target module's Fisher score, need, data rank and (optionally) weight rank on `files`.

    Runs `config.runs_for(n)` seeded runs, each over a seeded subset, stopping a run early once its
    ranking has converged. Raises `Interrupted` when `should_stop()` turns true (on any process). Under
    torchrun the batches are split over the processes and the result equals one process's; only process 0
    reports progress.
    """
    started = time.perf_counter()
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("run_analysis needs at least one sample file.")
    names = targetable_modules(loaded.num_layers)
    report = on_progress if on_progress is not None and distributed.current().is_main else (lambda _p: None)
    plan = _Plan(config.runs_for(len(files)), config.batches_for(len(files)))
    spec = DatasetSpec.from_model_config(loaded.entry.config)
    runs: list[RunInfo] = []
    with FisherEngine(loaded.transformer, names, config.sketch_k, config.seed) as engine:
        for run in range(plan.runs):
            runs.append(_one_run(engine, config, loaded, files, spec, run, plan, report, should_stop))
        engine.sum_over_processes()
        ranks = _weight_ranks(engine.weights, config, plan, report, should_stop)
        modules = _module_stats(names, engine, runs, ranks, config)
        sketches = [z.detach() for z in engine.sketch]
    report(Progress("done", plan.runs, plan.runs, runs[-1].batches, plan.batches, plan.done, plan.done))
    return AnalysisResult(
        modules=tuple(modules),
        runs=tuple(runs),
        cross_run_spearman=mean_pairwise_spearman([r.fisher for r in runs]),
        sketch_k=config.sketch_k,
        seconds=time.perf_counter() - started,
        sketches=({n: z.cpu() for n, z in zip(names, sketches)}
                  if config.keep_sketches or config.write_init else None),
    )


# ---- helpers ---------------------------------------------------------------------------------------


class _Plan:
    """Batch bookkeeping for the progress bar: planned total shrinks when a run stops early."""

    def __init__(self, runs: int, batches: int) -> None:
        self.runs, self.batches, self.done = runs, batches, 0
        self.total = runs * batches

    def finish_run(self, used: int) -> None:
        self.total -= self.batches - used


def run_subset(files: Sequence[Path], take: int, seed: int, run: int) -> list[Path]:
    """The run's samples: the files shuffled with (seed, run), first `take` of them."""
    order = sorted(files)
    random.Random(mix_seed(seed, run)).shuffle(order)
    return order[:take]


def _one_run(engine: FisherEngine, config: AnalysisConfig, loaded: LoadedModel, files: list[Path],
             spec: DatasetSpec, run: int, plan: _Plan, report: Callable[[Progress], None],
             should_stop: Callable[[], bool] | None) -> RunInfo:
    """Batches of one sample, one noise draw and one timestep each, until done or converged.

    Process p of W computes batches p, p + W, ...; see the module docstring for how they are folded.
    """
    ctx = distributed.current()
    world, rank = ctx.world_size, ctx.rank
    subset = run_subset(files, config.subset_size(len(files)), config.seed, run)
    gen = torch.Generator().manual_seed(mix_seed(config.seed, run, 1))
    sampler = sampler_for_focus(config.focus_label, loaded.variant)
    tracker = ConvergenceTracker(config.convergence_patience, config.convergence_threshold)
    total = torch.zeros_like(engine.sq)  # the run's Σ||G||², folded in batch order
    used = 0
    for first in range(0, plan.batches, world):
        stop = should_stop is not None and should_stop()
        engine.reset_fisher()
        mine = first + rank if first + rank < plan.batches else None
        undo = engine.snapshot() if world > 1 and mine is not None else None
        if not stop:
            _round(engine, loaded, subset, spec, sampler, gen, first, min(first + world, plan.batches), mine)
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
            if undo is not None and mine is not None and mine >= used:  # this process's batch came after the stop
                engine.restore(undo)
            break
    plan.finish_run(used)
    scores = total.cpu().numpy().astype(np.float64) / (engine.numel * used)
    return RunInfo(run + 1, tuple(p.name for p in subset), len(files), used, tracker.last, tracker.converged,
                   tuple(float(x) for x in scores))


def _round(engine: FisherEngine, loaded: LoadedModel, subset: list[Path], spec: DatasetSpec, sampler,
           gen: torch.Generator, first: int, end: int, mine: int | None) -> None:
    """Draw t and noise for batches first..end-1 (all of them, to keep the stream) and run this process's one."""
    runtime = loaded.runtime
    for b in range(first, end):
        batch = collate([load_sample(subset[b % len(subset)], spec)])
        if b == mine:  # moved before drawing, so the noise is cast exactly as one process casts it
            batch = batch.to(runtime.device, runtime.dtype)
        t = sampler.sample(1, gen)
        noise = noise_like(batch.target_latents, gen)
        if b == mine:
            try:
                engine.step(batch, t, noise)
            except (RuntimeError, MemoryError) as err:
                if not is_out_of_memory(err):
                    raise
                raise _out_of_memory(subset[b % len(subset)], batch, runtime, b) from err


def _out_of_memory(path: Path, batch, runtime, index: int) -> SidestepError:
    """Which sample (and process) asked for the memory, and what bounds it."""
    ctx = distributed.current()
    where = f" in process {ctx.rank}" if ctx.is_distributed else ""
    frames = int(batch.target_latents.shape[1])
    return SidestepError(
        f"Ran out of {runtime.device.type} memory{where} analysing {path.name} (batch {index + 1}, {frames} latent "
        f"frames); turn on --gradient-checkpointing, use --precision bf16, or shorten the longest samples "
        f"(sidestep preprocess --max-duration).")


def _weight_ranks(weights: Sequence[torch.Tensor], config: AnalysisConfig, plan: _Plan,
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


def _module_stats(names: Sequence[str], engine: FisherEngine, runs: Sequence[RunInfo],
                  weight_ranks: Sequence[int | None], config: AnalysisConfig) -> list[ModuleStats]:
    per_run = np.array([r.fisher for r in runs], dtype=np.float64)  # runs × modules
    mean = per_run.mean(axis=0)
    std = per_run.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
    batches = sum(r.batches for r in runs)
    zsq = engine.zsq.cpu().numpy().astype(np.float64)
    stats = []
    for i, (name, weight, z) in enumerate(zip(names, engine.weights, engine.sketch)):
        sv = singular_values(z)
        need = need_estimate(z, engine.gram[i], float(zsq[i]), batches) if z.shape[1] else None
        stats.append(ModuleStats(
            name=name,
            in_features=int(weight.shape[1]),
            out_features=int(weight.shape[0]),
            fisher=float(mean[i]),
            fisher_std=float(std[i]),
            data_rank=energy_rank(sv, config.data_rank_energy),
            grad_energy=float((sv**2).sum() / (batches**2 * engine.numel[i])),
            weight_rank=weight_ranks[i],
            need=need,
        ))
    return stats
