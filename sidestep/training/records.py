"""What a run leaves besides its adapter: `metrics.csv`, validation loss with `best/`, and step checkpoints.

Each is a loop callback (`training/loop.py` `LoopCallback`), so the loop body stays one readable function.
Only process 0 records and validates (validation on one process gives the same loss for any process count);
every process runs the `Checkpointer`, whose save writes on process 0 only. Layout: docs/training-records.md.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from sidestep.data import DatasetSpec, Sample, collate, load_sample
from sidestep.errors import ConfigError
from sidestep.fileio import write_bytes_atomic, write_error_reason
from sidestep.interrupts import deferred
from sidestep.models.device import Runtime
from sidestep.objective import TimestepSampler, flow_matching_loss, noise_like
from sidestep.seeding import mix_seed
from sidestep.training.events import Notice, OnEvent, Validated
from sidestep.training.loop import LoopState
from sidestep.training.report import Reporter

__all__ = ["METRICS_FILE", "BEST_DIR", "VAL_DRAWS", "MetricsRow", "MetricsLog", "read_metrics", "split_validation",
           "Validator", "RunRecorder", "Checkpointer"]

METRICS_FILE = "metrics.csv"
BEST_DIR = "best"
VAL_DRAWS = 4  # (timestep, noise) draws per validation file: one draw is too noisy to pick a best step by
_VAL_SALT = 0x7A11D


@dataclass(frozen=True)
class MetricsRow:
    """One optimizer step; `seconds` is the training wall time up to its end (continued across resumes)."""

    step: int
    epoch: float
    loss: float
    loss_ema: float
    lr: float
    grad_norm: float
    seconds: float
    val_loss: float | None = None

    def line(self) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(["" if v is None else repr(v) for v in astuple(self)])
        return out.getvalue()


COLUMNS = tuple(f.name for f in fields(MetricsRow))
_HEADER = ",".join(COLUMNS) + "\n"


def read_metrics(path: Path) -> list[MetricsRow]:
    """The complete rows of a metrics.csv (a line cut short by a kill is left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for cells in csv.DictReader(fh):
            try:
                val = cells.get("val_loss") or ""
                rows.append(MetricsRow(int(cells["step"]), *(float(cells[c]) for c in COLUMNS[1:-1]),
                                       float(val) if val else None))
            except (KeyError, TypeError, ValueError):
                continue
    return rows


class MetricsLog:
    """OUTPUT/metrics.csv: one row per optimizer step, flushed and fsynced as it is written, so a killed run
    keeps every row but the one being written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh: io.TextIOWrapper | None = None

    def open(self, step: int) -> list[MetricsRow]:
        """Continue the file at `step`: rows of later steps (a run resumed from an earlier checkpoint) are dropped;
        a run from step 0 starts a new file (an older one is kept as metrics.csv.bak). Returns the kept rows."""
        rows = read_metrics(self.path)
        kept = [r for r in rows if r.step <= step]
        if step == 0 and self.path.exists():
            os.replace(self.path, self.path.with_name(self.path.name + ".bak"))
        if not self.path.exists() or kept != rows or not self._has_header():
            write_bytes_atomic(self.path, (_HEADER + "".join(r.line() for r in kept)).encode("utf-8"))
        self._fh = open(self.path, "a", encoding="utf-8", newline="")
        return kept

    def append(self, row: MetricsRow) -> None:
        assert self._fh is not None, "open() first"
        with deferred():  # a Ctrl-C never leaves half a row
            self._fh.write(row.line())
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def _has_header(self) -> bool:
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            return fh.readline() == _HEADER


def split_validation(files: tuple[Path, ...], share: float, seed: int) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(train, validation) files: a seeded draw of round(share × n) files (at least one), by file, in sorted order."""
    n = len(files)
    count = max(1, round(share * n))
    if count >= n:
        raise ConfigError(f"--val-split {share:g} of {n} file(s) leaves nothing to train on; lower it, or give "
                          f"separate files with --val-dir.")
    gen = torch.Generator().manual_seed(mix_seed(seed, _VAL_SALT))
    held = set(torch.randperm(n, generator=gen)[:count].tolist())
    return (tuple(f for i, f in enumerate(files) if i not in held), tuple(f for i, f in enumerate(files) if i in held))


class Validator:
    """The flow-matching loss on the validation files at fixed draws: file i always gets the same crop, timesteps
    and noise (seeded by (seed, i)), with the condition kept, so two measurements differ only by the weights."""

    def __init__(self, model: torch.nn.Module, files: tuple[Path, ...], spec: DatasetSpec, sampler: TimestepSampler,
                 seed: int, runtime: Runtime, max_length: int | None = None, cache: bool = True) -> None:
        self.model, self.files, self.spec, self.sampler = model, files, spec, sampler
        self.seed, self.runtime, self.max_length = seed, runtime, max_length
        self._cache: dict[int, Sample] | None = {} if cache else None

    def loss(self) -> float:
        rt = self.runtime
        autocast = torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32)
        was_training = self.model.training
        total, count = 0.0, 0
        self.model.eval()  # no adapter dropout: the global RNG is not drawn from
        try:
            with torch.no_grad():
                for i in range(len(self.files)):
                    gen = torch.Generator().manual_seed(mix_seed(self.seed, i, _VAL_SALT))
                    sample = self._sample(i)
                    if self.max_length is not None and sample.length > self.max_length:
                        start = int(torch.randint(sample.length - self.max_length + 1, (1,), generator=gen))
                        sample = sample.crop(start, self.max_length)
                    batch = collate([sample]).to(rt.device, rt.dtype)
                    for _ in range(VAL_DRAWS):
                        t = self.sampler.sample(1, gen)
                        noise = noise_like(batch.target_latents, gen)
                        with autocast:
                            total += float(flow_matching_loss(self.model, batch, t, noise))
                        count += 1
        finally:
            self.model.train(was_training)
        return total / count

    def _sample(self, index: int) -> Sample:
        if self._cache is None:
            return load_sample(self.files[index], self.spec)
        if index not in self._cache:
            self._cache[index] = load_sample(self.files[index], self.spec)
        return self._cache[index]


class RunRecorder:
    """Process 0's record of every step: validation when due (a new lowest loss saves `best/`), then the
    metrics.csv row, then the reporter (TensorBoard / W&B). A failed metrics write warns once and training
    goes on: a lost log line must never cost a run."""

    def __init__(self, metrics: MetricsLog, epoch_of: Callable[[int], float], total_steps: int,
                 on_event: OnEvent, validator: Validator | None = None, val_every: int = 0,
                 save_best: Callable[[int, float], Path] | None = None, reporter: Reporter | None = None) -> None:
        self.metrics, self.epoch_of, self.total = metrics, epoch_of, total_steps
        self.on_event, self.validator, self.val_every = on_event, validator, val_every
        self.save_best, self.reporter = save_best, reporter
        self.rows: list[MetricsRow] = []
        self.best: tuple[float, int] | None = None  # (validation loss, step)
        self.written = 0
        self._seconds0, self._clock = 0.0, time.perf_counter()
        self._broken = False

    @property
    def last(self) -> MetricsRow | None:
        return self.rows[-1] if self.rows else None

    def on_train_start(self, state: LoopState) -> None:
        try:
            self.rows = self.metrics.open(state.step)
        except OSError as err:
            self._give_up(err)
        self.written = state.step
        self._seconds0 = self.rows[-1].seconds if self.rows else 0.0
        self._clock = time.perf_counter()
        measured = [(r.val_loss, r.step) for r in self.rows if r.val_loss is not None]
        self.best = min(measured) if measured else None  # a resumed run keeps the best of its earlier steps

    def on_step_end(self, state: LoopState) -> None:
        val = None
        if self.validator is not None and (state.step % self.val_every == 0 or state.step == self.total):
            val = self.validator.loss()
            better = math.isfinite(val) and (self.best is None or val < self.best[0])
            if better and self.save_best is not None:
                self.save_best(state.step, val)
                self.best = (val, state.step)
            self.on_event(Validated(state.step, val, better, self.best[1] if self.best else None))
        self._record(state, val)

    def on_train_end(self, state: LoopState) -> None:
        if state.step > self.written:  # a Ctrl-C cut this step's on_step_end short
            self._record(state, None)
        self.metrics.close()

    def _record(self, state: LoopState, val: float | None) -> None:
        if state.stats is None or state.step <= self.written:
            return
        s = state.stats
        seconds = self._seconds0 + (time.perf_counter() - self._clock)
        row = MetricsRow(state.step, round(self.epoch_of(state.step), 6), s.loss, float(state.loss_ema or s.loss),
                         s.lr, s.grad_norm, round(seconds, 3), val)
        self.rows.append(row)
        self.written = state.step
        if not self._broken:
            try:
                self.metrics.append(row)
            except OSError as err:
                self._give_up(err)
        if self.reporter is not None:
            self.reporter.log(row)

    def _give_up(self, err: OSError) -> None:
        self._broken = True
        self.metrics.close()
        self.on_event(Notice(f"{self.metrics.path} cannot be written ({write_error_reason(err)}); training goes on "
                             f"without it."))


class Checkpointer:
    """A resumable checkpoint every `every_epochs` epochs and every `every_steps` steps (the last step is the
    caller's final/). `save` writes on process 0 and prunes to --keep-last there; every process calls it."""

    def __init__(self, save: Callable[[LoopState], Path], every_epochs: int, every_steps: int, micro_per_epoch: int,
                 grad_accum: int, total_steps: int) -> None:
        self.save, self.every_epochs, self.every_steps = save, every_epochs, every_steps
        self.micro_per_epoch, self.grad_accum, self.total = micro_per_epoch, grad_accum, total_steps

    def due(self, step: int) -> bool:
        if step >= self.total:
            return False
        if self.every_steps and step % self.every_steps == 0:
            return True
        done_before = ((step - 1) * self.grad_accum) // self.micro_per_epoch
        done = (step * self.grad_accum) // self.micro_per_epoch
        return bool(self.every_epochs) and done > done_before and done % self.every_epochs == 0

    def on_train_start(self, state: LoopState) -> None:
        """Nothing to prepare."""

    def on_step_end(self, state: LoopState) -> None:
        if self.due(state.step):
            state.last_checkpoint = self.save(state)

    def on_train_end(self, state: LoopState) -> None:
        """The final adapter (or the Ctrl-C checkpoint) is written by the caller."""
