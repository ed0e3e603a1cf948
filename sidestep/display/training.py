"""Training's terminal view, shared by `sidestep train`, the demo and the wizard: progress and messages.

On a terminal a live progress bar; otherwise (nohup, CI, a pipe) plain lines, about twenty per run and at least
one a minute, so a log file shows progress. Dashboards (--report-to) are written by the library, not here.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sidestep.display import output

__all__ = ["TrainDisplay", "print_map_summary"]


_LINES_PER_RUN = 20
_LINE_EVERY_S = 60.0


class TrainDisplay:
    """The rich progress bar (or plain lines off a terminal) and messages for training events."""

    def __init__(self, output_dir: Path, live: bool | None = None, intro: list[str] | tuple[str, ...] = ()) -> None:
        self.output_dir = Path(output_dir)
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("epoch {task.fields[epoch]:.2f}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=output.console, transient=False,
        )
        self.task: Any = None
        self._loading = contextlib.ExitStack()
        self.live = output.console.is_terminal if live is None else live
        self.intro = tuple(intro)  # lines said when training starts (e.g. where a recipe's values came from)
        self._every, self._last_line = 1, 0.0

    def __enter__(self) -> "TrainDisplay":
        # checking the dataset and loading the model take a while before the bar: say so (terminal only)
        self._loading = contextlib.ExitStack()
        self._loading.enter_context(output.status("Checking the dataset and loading the model…"))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loading.close()
        if self.task is not None:  # the bar only exists once training started, so early errors stay one line
            self.bar.stop()

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
        elif isinstance(event, events.Validated):
            best = " (best so far, saved to best/)" if event.best else (
                f" (best: step {event.best_step})" if event.best_step is not None else "")
            output.info(f"Validation loss at step {event.step}: {event.val_loss:.4f}{best}")

    def _samples(self, event: Any) -> None:
        folder = event.files[0].parent if event.files else "-"
        output.info(f"Samples at step {event.step}: {len(event.files)} in {folder} ({event.seconds:.1f} s)")

    def _started(self, event: Any) -> None:
        self._loading.close()
        for line in self.intro:
            output.info(line)
        output.info(f"Model: {event.model}")
        output.info(f"Runtime: {event.runtime}")
        mode = "Adaptive Rank" if event.adaptive else "flat rank"
        resumed = f", resuming at step {event.start_step}" if event.start_step else ""
        output.info(f"{event.samples} samples, {event.steps_per_epoch} steps/epoch, {event.total_steps} steps "
                    f"({mode}, {event.trainable_params:,} trainable parameters, timesteps {event.timestep_mode}{resumed}).")
        if event.processes > 1:
            output.info(f"{event.processes} processes: effective batch {event.effective_batch} "
                        f"(batch × grad-accum × {event.processes} processes).")
        output.info(f"Metrics: {self.output_dir / 'metrics.csv'} (one row per step); record: "
                    f"{self.output_dir / 'run.json'}")
        if not self.live:
            self._every = max(1, round(event.total_steps / _LINES_PER_RUN))
            self._last_line = time.monotonic()
            return
        self.task = self.bar.add_task("train", total=event.total_steps, completed=event.start_step,
                                      epoch=0.0, loss="-", lr="-", rate="-")
        self.bar.start()

    def _progress(self, event: Any) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=event.step, epoch=event.epoch, loss=f"{event.loss_ema:.4f}",
                            lr=f"{event.lr:.2e}", rate=f"{event.it_per_s:.2f}")
        elif not self.live:
            now = time.monotonic()
            if event.step % self._every == 0 or event.step == event.total_steps or now - self._last_line >= _LINE_EVERY_S:
                self._last_line = now
                output.info(f"step {event.step}/{event.total_steps}  epoch {event.epoch:.2f}  loss {event.loss:.4f}  "
                            f"ema {event.loss_ema:.4f}  lr {event.lr:.2e}  {event.it_per_s:.2f} it/s")


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

