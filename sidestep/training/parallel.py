"""Data-parallel training helpers: what `train()` adds when torchrun / accelerate launch started N processes.

Plain `torch.distributed`, not DDP or an Accelerator: only the adapter trains, so one flat all-reduce of its
gradients (and the step loss) per optimizer step, after the micro-batches and before clipping, is exactly
DDP's averaging, needs no `no_sync` for grad-accum, and leaves the peft-injected model unwrapped (parameter
names, gradient checkpointing and saving unchanged). The sample order shards itself (loop.SampleOrder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from sidestep import distributed
from sidestep.distributed import DistContext
from sidestep.seeding import mix_seed
from sidestep.training.config import TrainConfig
from sidestep.training.events import Notice

__all__ = ["effective_batch", "resume_notice", "seed_process_rng", "sync_for"]


def effective_batch(config: TrainConfig) -> int:
    """Samples per optimizer step: batch × grad-accum × processes."""
    return config.batch_size * config.grad_accum * distributed.current().world_size


def sync_for(dist: DistContext) -> Callable[[list[torch.nn.Parameter], float], float] | None:
    """The loop's gradient/loss averaging for several processes; None for one."""
    if not dist.is_distributed:
        return None
    return lambda params, loss: distributed.average_gradients(params, loss)[0]


def seed_process_rng(seed: int, step: int) -> None:
    """Give processes 1.. their own global RNG stream (adapter dropout), reproducible from (seed, rank, step).

    Process 0 keeps the stream that checkpoints save and restore.
    """
    rank = distributed.current().rank
    if rank > 0:
        torch.manual_seed(mix_seed(seed, rank, step))


def resume_notice(resumed: dict[str, Any], config: TrainConfig, resume_dir: Path) -> Notice | None:
    """The state is world-size independent; only a changed effective batch changes the curve, so say so."""
    saved, now = resumed.get("effective_batch"), effective_batch(config)
    if saved is None or int(saved) == now:
        return None
    return Notice(f"{resume_dir} was trained with {saved} samples per optimizer step and this run uses {now} "
                  "(batch × grad-accum × processes); set --grad-accum so they match to continue the same loss "
                  "curve.")
