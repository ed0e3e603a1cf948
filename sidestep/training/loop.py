"""The training loop: one readable function, a comment per phase (nanoGPT style), plus its small helpers.

Everything random is derived from (seed, position), never from a shared stream: the sample order of
epoch E from (seed, E), and each sample's crop, CFG dropout, timestep and noise from (seed, E, its position
in that order). So the state to resume is just the step count (plus optimizer, scheduler and the global RNG
that adapter dropout uses), and the draws depend neither on the number of processes (each rank takes its own
shard) nor on how samples are grouped: batch B x grad-accum A trains like batch B·A when no padding is needed.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.utils.data

from sidestep.data import Batch, DatasetSpec, Sample, collate, load_sample
from sidestep.errors import Interrupted, SidestepError, TrainingDiverged, is_out_of_memory
from sidestep.interrupts import deferred
from sidestep.models.device import Runtime
from sidestep.objective import TimestepSampler, apply_cfg_dropout, flow_matching_loss, noise_like
from sidestep.seeding import mix_seed
from sidestep.training.config import OptimizerKind, SchedulerKind, TrainConfig
from sidestep.training.events import OnEvent, Progress

__all__ = ["LoopState", "StepStats", "LoopCallback", "LoopContext", "Optimization", "SampleOrder", "train_loop", "build_optimization",
           "lr_factor", "check_loss", "capture_rng", "restore_rng", "EMA_BETA", "MicroBatchFeed"]

EMA_BETA = 0.9
LOADER_WORKERS = 2  # processes that read samples ahead when the dataset does not stay in RAM
_MIN_GUARD_STEPS = 10  # the loss EMA needs some history before a spike means anything


@dataclass(frozen=True)
class StepStats:
    """What the last optimizer step measured (for metrics.csv): its loss, the gradient norm before clipping,
    the learning rate it applied, and its wall time in seconds."""

    loss: float
    grad_norm: float
    lr: float
    seconds: float


@dataclass
class LoopState:
    """Progress that survives a restart; `rng` is the global RNG captured at this step boundary."""

    step: int = 0
    loss_ema: float | None = None
    rng: dict[str, Any] | None = None
    last_checkpoint: Path | None = None
    stats: StepStats | None = None  # of step `step` in this process; None before the first step of a run


class LoopCallback(Protocol):
    """Work the loop hands off at step boundaries (checkpoints, metrics, validation, samples). A callback must leave
    the training state as it found it: the model's mode, the global RNG, the gradients.

    `on_train_end` runs when the last step is done, and on Ctrl-C before the resumable checkpoint is written
    (so a step whose `on_step_end` was cut short is still recorded)."""

    def on_train_start(self, state: LoopState) -> None: ...

    def on_step_end(self, state: LoopState) -> None: ...

    def on_train_end(self, state: LoopState) -> None: ...


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]


class SampleOrder:
    """Epoch-seeded shuffling, shardable per rank, with optional random crops; micro-batch M -> Batch.

    Global micro-batch G of an epoch holds samples perm[G·b : (G+1)·b]; process `rank` of `world_size` runs
    the global micro-batches rank, rank + world_size, ... (a disjoint shard; with several processes the
    epoch's order is padded by wrapping so every process runs the same number of micro-batches). So N
    processes × grad-accum A see exactly the micro-batches of one process × grad-accum N·A.
    """

    def __init__(self, files: tuple[Path, ...], spec: DatasetSpec, batch_size: int, seed: int,
                 max_length: int | None = None, rank: int = 0, world_size: int = 1, cache: bool = True):
        self.files, self.spec, self.batch_size, self.seed = files, spec, batch_size, seed
        self.max_length, self.rank, self.world_size = max_length, rank, world_size
        per_rank = math.ceil(len(files) / world_size)
        self.micro_per_epoch = math.ceil(per_rank / batch_size)
        self._cache: dict[int, Sample] | None = {} if cache else None
        self._perm: tuple[int, list[int]] | None = None

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def positions(self, micro: int) -> tuple[int, list[int]]:
        """(epoch, positions in that epoch's order) of the samples of this rank's micro-batch `micro`."""
        epoch, pos = divmod(micro, self.micro_per_epoch)
        start = (pos * self.world_size + self.rank) * self.batch_size
        return epoch, list(range(start, start + len(self.indices(micro))))

    def generators(self, micro: int) -> list[torch.Generator]:
        """One generator per sample of micro-batch `micro`, seeded by (seed, epoch, position): layout-independent."""
        epoch, positions = self.positions(micro)
        return [torch.Generator().manual_seed(mix_seed(self.seed, epoch, p, 1)) for p in positions]

    def global_micro(self, micro: int) -> int:
        """The layout-independent index of this rank's micro-batch `micro` (seeds its randomness)."""
        return micro * self.world_size + self.rank

    def indices(self, micro: int) -> list[int]:
        """Sample indices of micro-batch `micro` for this rank (the last one of an epoch may be short)."""
        epoch, pos = divmod(micro, self.micro_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
            perm = torch.randperm(len(self.files), generator=gen).tolist()
            if self.world_size > 1:  # DistributedSampler-style padding keeps the processes in lockstep
                slots = self.micro_per_epoch * self.world_size * self.batch_size
                perm = (perm * math.ceil(slots / len(perm)))[:slots]
            self._perm = (epoch, perm)
        start = (pos * self.world_size + self.rank) * self.batch_size
        return self._perm[1][start : start + self.batch_size]

    def batch(self, micro: int, gens: list[torch.Generator]) -> Batch:
        """The samples of micro-batch `micro`, each cropped (when longer than `max_length`) with its own generator."""
        samples = []
        for index, gen in zip(self.indices(micro), gens, strict=True):
            sample = self._load(index)
            if self.max_length is not None and sample.length > self.max_length:
                start = int(torch.randint(sample.length - self.max_length + 1, (1,), generator=gen))
                sample = sample.crop(start, self.max_length)
            samples.append(sample)
        return collate(samples)

    def _load(self, index: int) -> Sample:
        if self._cache is None:
            return load_sample(self.files[index], self.spec)
        if index not in self._cache:
            self._cache[index] = load_sample(self.files[index], self.spec)
        return self._cache[index]


@dataclass
class LoopContext:
    model: torch.nn.Module
    order: SampleOrder
    opt: Optimization
    config: TrainConfig
    sampler: TimestepSampler
    null_embedding: torch.Tensor | None
    runtime: Runtime
    total_steps: int
    checkpoint: Callable[[LoopState], Path]  # writes a resumable checkpoint of the current weights
    advice: str  # appended to a divergence error
    on_event: OnEvent = field(default=lambda event: None)
    # Several processes: averages the gradients of the params and the step loss over them (one all-reduce).
    sync: Callable[[list[torch.nn.Parameter], float], float] | None = None
    callbacks: tuple[LoopCallback, ...] = ()


def train_loop(ctx: LoopContext, state: LoopState) -> LoopState:
    """Run optimizer steps from `state.step` to `ctx.total_steps`; returns the final state."""
    cfg, opt, model, rt = ctx.config, ctx.opt, ctx.model, ctx.runtime
    autocast = torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32)
    started, start_step = time.perf_counter(), state.step
    if state.rng is None:
        state.rng = capture_rng()
    model.train()
    feed = MicroBatchFeed(ctx.order, state.step * cfg.grad_accum, ctx.total_steps * cfg.grad_accum)
    try:
        for callback in ctx.callbacks:
            callback.on_train_start(state)
        while state.step < ctx.total_steps:
            step_started = time.perf_counter()
            # ---- forward/backward over grad_accum micro-batches; each sample's randomness from its position
            step_loss = 0.0
            for k in range(cfg.grad_accum):
                gens, batch = feed.get(state.step * cfg.grad_accum + k)
                try:
                    batch = batch.to(rt.device, rt.dtype)
                    cond = apply_cfg_dropout(batch.encoder_hidden_states, ctx.null_embedding, cfg.cfg_dropout, gens)
                    t = torch.cat([ctx.sampler.sample(1, g) for g in gens])
                    noise = torch.stack([noise_like(x, g) for x, g in zip(batch.target_latents, gens)])
                    with autocast:
                        loss = flow_matching_loss(model, batch, t, noise, encoder_hidden_states=cond)
                    opt.scaler.scale(loss / cfg.grad_accum).backward()
                except (RuntimeError, MemoryError) as err:
                    if not is_out_of_memory(err):
                        raise
                    raise _out_of_memory(batch, state.step + 1, cfg, rt, ctx.order) from err
                step_loss += float(loss.detach()) / cfg.grad_accum

            # ---- several processes: average gradients and loss (= DDP), so every decision below agrees
            if ctx.sync is not None:
                step_loss = ctx.sync(opt.params, step_loss)

            # ---- clip (after unscaling fp16 grads); a non-finite norm is divergence, unless the fp16 loss
            # scaler overflowed, which it handles itself by skipping the step and lowering its scale
            opt.scaler.unscale_(opt.optimizer)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(opt.params, max_norm))
            grad_norm = 0.0 if opt.scaler.is_enabled() and not math.isfinite(grad_norm) else grad_norm

            # ---- loss-spike guard: stop before a bad update, the last checkpoint stays the good one
            problem = check_loss(step_loss, grad_norm, state, cfg)
            if problem:
                opt.optimizer.zero_grad(set_to_none=True)
                where = state.last_checkpoint or "none was saved yet"
                raise TrainingDiverged(f"{problem} at step {state.step + 1}; training stopped, last good "
                                       f"checkpoint: {where}. {ctx.advice}")

            # ---- optimizer, lr schedule and the step counter: one section a Ctrl-C/SIGTERM cannot split, so a
            # checkpoint's weights and step always agree (a resumed run never applies a step twice)
            with deferred():
                lr = opt.scheduler.get_last_lr()[0]  # the rate this step applies
                opt.scaler.step(opt.optimizer)
                opt.scaler.update()
                opt.scheduler.step()
                opt.optimizer.zero_grad(set_to_none=True)
                ema = step_loss if state.loss_ema is None else EMA_BETA * state.loss_ema + (1 - EMA_BETA) * step_loss
                stats = StepStats(step_loss, grad_norm, lr, time.perf_counter() - step_started)
                state = replace(state, step=state.step + 1, loss_ema=ema, rng=capture_rng(), stats=stats)

            # ---- progress (a KeyboardInterrupt raised here is handled like Ctrl-C)
            rate = (state.step - start_step) / max(time.perf_counter() - started, 1e-9)
            ctx.on_event(Progress(state.step, ctx.total_steps, state.step * cfg.grad_accum / ctx.order.micro_per_epoch,
                                  step_loss, ema, opt.scheduler.get_last_lr()[0], rate))
            # ---- checkpoints, metrics, validation, samples (training/records.py, training/sampling.py)
            for callback in ctx.callbacks:
                callback.on_step_end(state)
        for callback in ctx.callbacks:
            callback.on_train_end(state)
    except KeyboardInterrupt:
        # ---- Ctrl-C: drop the half-accumulated step, record the steps done, save a resumable checkpoint, stop
        opt.optimizer.zero_grad(set_to_none=True)
        with deferred(reraise=False):  # a second Ctrl-C while saving is ignored: the checkpoint completes
            for callback in ctx.callbacks:
                callback.on_train_end(state)
            path = ctx.checkpoint(state)
        raise Interrupted(f"Interrupted at step {state.step}; a resumable checkpoint is in {path} "
                          f"(continue with --resume latest).") from None
    finally:
        feed.close()
        model.eval()
    return state


def _identity(item: Any) -> Any:
    return item


def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave Ctrl-C/SIGTERM to the main process (which saves a checkpoint, then shuts them down)
    and use one thread each, so they never compete with the training step for cores."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch M of a SampleOrder, read and cropped in a loader worker. It returns the per-sample generators'
    states after the crop, so the main process continues each sample's stream exactly where the worker left it;
    an error comes back as a value and is raised by the main process as itself (one sentence, no worker trace)."""

    def __init__(self, order: SampleOrder) -> None:
        self.order = order

    def __getitem__(self, micro: int) -> tuple[int, Batch | None, list[torch.Tensor] | None, BaseException | None]:
        try:
            gens = self.order.generators(micro)
            batch = self.order.batch(micro, gens)
        except Exception as err:  # noqa: BLE001 - handed to the main process, which raises it
            return micro, None, None, err
        return micro, batch, [g.get_state() for g in gens], None


class MicroBatchFeed:
    """The micro-batches of a run, in order. A dataset small enough to stay in RAM is read in the loop; a larger
    one through a `torch.utils.data.DataLoader` whose workers read and crop the next micro-batches while this one
    trains. Both give the same batches and draws (tested): every random choice follows (seed, epoch, position)."""

    def __init__(self, order: SampleOrder, start: int, stop: int, workers: int = LOADER_WORKERS) -> None:
        self.order = order
        self._it: Any = None
        if not order.cached and stop > start and workers > 0:
            loader = torch.utils.data.DataLoader(_MicroBatches(order), batch_size=None, sampler=range(start, stop),
                                                 num_workers=workers, collate_fn=_identity,
                                                 worker_init_fn=_quiet_worker, prefetch_factor=2,
                                                 # its own generator: the workers' base seed must not draw from the
                                                 # global RNG, which adapter dropout uses
                                                 generator=torch.Generator().manual_seed(0))
            self._it = iter(loader)

    def get(self, micro: int) -> tuple[list[torch.Generator], Batch]:
        if self._it is None:
            gens = self.order.generators(micro)
            return gens, self.order.batch(micro, gens)
        got, batch, states, err = next(self._it)
        if err is not None:
            raise err
        if got != micro or batch is None or states is None:
            raise RuntimeError(f"internal: the loader gave micro-batch {got} where {micro} was due")
        gens = self.order.generators(micro)
        for gen, saved in zip(gens, states, strict=True):
            gen.set_state(saved)
        return gens, batch

    def close(self) -> None:
        self._it = None  # the iterator's finalizer stops the workers


def check_loss(loss: float, grad_norm: float, state: LoopState, cfg: TrainConfig) -> str | None:
    """Why this step must not be applied (NaN/Inf loss or gradient, or a spike over the EMA), else None."""
    if not math.isfinite(loss):
        return f"The loss became {_bad(loss)}"
    if not math.isfinite(grad_norm):
        return f"The gradient norm became {_bad(grad_norm)}"
    guard_from = max(cfg.warmup_steps, _MIN_GUARD_STEPS)
    if cfg.spike_factor > 0 and state.loss_ema is not None and state.step >= guard_from:
        if loss > cfg.spike_factor * state.loss_ema:
            return f"The loss spiked to {loss:.4g} ({loss / state.loss_ema:.1f}x its average {state.loss_ema:.4g})"
    return None


def _out_of_memory(batch: Batch, step: int, cfg: TrainConfig, rt: Runtime, order: SampleOrder) -> SidestepError:
    """Which samples (and process) asked for the memory, how long they were, and the flag that bounds it."""
    names = ", ".join(batch.names[:3]) + (" …" if len(batch.names) > 3 else "")
    frames = int(batch.target_latents.shape[1])
    bound = (f"--max-latent-length {cfg.max_latent_length}" if cfg.max_latent_length is not None
             else "no --max-latent-length")
    where = f" in process {order.rank}" if order.world_size > 1 else ""
    return SidestepError(f"Ran out of {rt.device.type} memory{where} at step {step} on {names} ({frames} latent frames, "
                         f"batch {batch.size}, {bound}); lower --max-latent-length (e.g. {max(16, frames // 2)}) or "
                         f"--batch-size, or turn on --gradient-checkpointing.")


def _bad(value: float) -> str:
    return "NaN" if math.isnan(value) else "Inf"


def lr_factor(step: int, total: int, warmup: int, kind: SchedulerKind) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind is SchedulerKind.CONSTANT:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind is SchedulerKind.LINEAR:
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimization(params: list[torch.nn.Parameter], cfg: TrainConfig, total_steps: int,
                       runtime: Runtime) -> Optimization:
    """Optimizer over the adapter's fp32 weights, warmup + schedule, and a loss scaler for fp16 on CUDA."""
    if cfg.optimizer is OptimizerKind.ADAMW8BIT:
        import bitsandbytes as bnb  # checked importable by TrainConfig

        optimizer = bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer is OptimizerKind.PRODIGY:
        from prodigyopt import Prodigy  # checked importable by TrainConfig

        optimizer = Prodigy(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_steps, cfg.scheduler))
    fp16_cuda = runtime.dtype == torch.float16 and runtime.device.type == "cuda"
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=fp16_cuda)
    return Optimization(optimizer, scheduler, scaler, params)


def capture_rng() -> dict[str, Any]:
    """The global RNG states (adapter dropout draws from them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
