"""What training reports through its `on_event` callback; the CLI renders these, tests collect them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from sidestep.training.adapters import MapSummary

__all__ = ["Started", "Progress", "CheckpointSaved", "SamplesSaved", "Validated", "Notice", "MapSummary", "TrainEvent", "OnEvent", "noop"]


@dataclass(frozen=True)
class Started:
    """Emitted once the model and adapter are ready, before the first step."""

    model: str
    runtime: str  # device / precision / checkpointing, with reasons
    samples: int
    steps_per_epoch: int  # optimizer steps (fractional epochs round up)
    total_steps: int
    start_step: int  # > 0 when resuming
    trainable_params: int
    adaptive: bool
    timestep_mode: str
    processes: int = 1  # data-parallel processes (torchrun / accelerate launch)
    effective_batch: int = 0  # samples per optimizer step: batch × grad-accum × processes


@dataclass(frozen=True)
class Progress:
    """After every optimizer step."""

    step: int  # completed optimizer steps
    total_steps: int
    epoch: float  # epochs completed, fractional
    loss: float  # this step's loss (mean over its micro-batches)
    loss_ema: float
    lr: float
    it_per_s: float  # optimizer steps per second since this run (or resume) started


@dataclass(frozen=True)
class CheckpointSaved:
    path: Path
    step: int
    final: bool = False


@dataclass(frozen=True)
class SamplesSaved:
    """Audio samples rendered at `step` (0 = the model before training), one WAV per prompt."""

    step: int
    files: tuple[Path, ...]
    sample_rate: int
    seconds: float  # wall time of this round of sampling


@dataclass(frozen=True)
class Validated:
    """Validation loss measured after `step`; `best` when it is the lowest so far (saved to OUTPUT/best/)."""

    step: int
    val_loss: float
    best: bool
    best_step: int | None


@dataclass(frozen=True)
class Notice:
    """A warning or note the user should see (stale map, turbo fragility, resume details)."""

    message: str
    level: str = "warning"  # warning | info


TrainEvent = Union[Started, Progress, CheckpointSaved, SamplesSaved, Validated, Notice, MapSummary]
OnEvent = Callable[[TrainEvent], None]


def noop(event: TrainEvent) -> None:
    """The default sink: library code never prints."""
