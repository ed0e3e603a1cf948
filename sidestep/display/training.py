"""Training's terminal view, shared by `sidestep train`, the demo and the wizard: progress, messages, TensorBoard."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sidestep.display import output

__all__ = ["TrainDisplay", "print_map_summary"]


class TrainDisplay:
    """The rich progress bar and messages for training events; TensorBoard scalars when it is installed."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("epoch {task.fields[epoch]:.2f}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=output.console, transient=False,
        )
        self.task: Any = None
        self.writer: Any = None
        self._loading = contextlib.ExitStack()

    def __enter__(self) -> "TrainDisplay":
        # checking the dataset and loading the model take a while before the bar: say so (terminal only)
        self._loading = contextlib.ExitStack()
        self._loading.enter_context(output.status("Checking the dataset and loading the model…"))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loading.close()
        if self.task is not None:  # the bar only exists once training started, so early errors stay one line
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()

    def on_event(self, event: Any) -> None:
        from sidestep.training import events

        if isinstance(event, events.Progress):
            self._progress(event)
        elif isinstance(event, events.Notice):
            (output.warn if event.level == "warning" else output.info)(event.message)
        elif isinstance(event, events.MapSummary):
            print_map_summary(event)
        elif isinstance(event, events.Started):
            self._started(event)
        elif isinstance(event, events.CheckpointSaved):
            output.info(f"{'Final adapter' if event.final else 'Checkpoint'} saved: {event.path}")
        elif isinstance(event, events.SamplesSaved):
            self._samples(event)

    def _samples(self, event: Any) -> None:
        folder = event.files[0].parent if event.files else "-"
        output.info(f"Samples at step {event.step}: {len(event.files)} in {folder} ({event.seconds:.1f} s)")
        if self.writer is not None:
            import soundfile as sf
            import torch

            for path in event.files:
                audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
                mono = torch.from_numpy(audio.mean(axis=1))[None]  # TensorBoard audio is mono
                self.writer.add_audio(f"samples/{path.stem}", mono, event.step, sample_rate=rate)

    def _started(self, event: Any) -> None:
        self._loading.close()
        output.info(f"Model: {event.model}")
        output.info(f"Runtime: {event.runtime}")
        mode = "Adaptive Rank" if event.adaptive else "flat rank"
        resumed = f", resuming at step {event.start_step}" if event.start_step else ""
        output.info(f"{event.samples} samples, {event.steps_per_epoch} steps/epoch, {event.total_steps} steps "
                    f"({mode}, {event.trainable_params:,} trainable parameters, timesteps {event.timestep_mode}{resumed}).")
        if event.processes > 1:
            output.info(f"{event.processes} processes: effective batch {event.effective_batch} "
                        f"(batch × grad-accum × {event.processes} processes).")
        self.task = self.bar.add_task("train", total=event.total_steps, completed=event.start_step,
                                      epoch=0.0, loss="-", lr="-", rate="-")
        self.bar.start()
        self.writer = _tensorboard(self.output_dir / "tensorboard")

    def _progress(self, event: Any) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=event.step, epoch=event.epoch, loss=f"{event.loss_ema:.4f}",
                            lr=f"{event.lr:.2e}", rate=f"{event.it_per_s:.2f}")
        if self.writer is not None:
            for name, value in (("loss", event.loss), ("loss_ema", event.loss_ema), ("lr", event.lr)):
                self.writer.add_scalar(f"train/{name}", value, event.step)


def print_map_summary(summary: Any) -> None:
    """"Preprocessing++ map detected" and what the map changes; shared with the wizard."""
    adapted = sum(a for a, _ in summary.per_category.values())
    total = sum(t for _, t in summary.per_category.values())
    cats = ", ".join(f"{cat} {a}/{t}" for cat, (a, t) in summary.per_category.items())
    ranks = ", ".join(f"{rank}×{count}" for rank, count in summary.rank_histogram.items())
    share = summary.trainable_params / summary.flat_params if summary.flat_params else 0.0
    output.success(f"Preprocessing++ map detected: {summary.map_path}")
    output.info(f"  Adaptive Rank: {adapted}/{total} modules adapted ({cats})")
    output.info(f"  Ranks (rank×modules): {ranks}")
    output.info(f"  Trainable parameters: {summary.trainable_params:,} vs {summary.flat_params:,} for a flat rank "
                f"{summary.flat_rank} on every module ({share:.0%})")
    if summary.overrides:
        output.info(f"  The map sets each module's rank, alpha and target; not used: {', '.join(summary.overrides)}")


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(folder))
