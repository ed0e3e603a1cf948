"""`AnalysisConfig`: every choice of one Preprocessing++ run, validated once at construction.

The CLI and the wizard both build this; defaults live here only. Each error is one sentence naming the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from sidestep.analysis.allocate import BudgetMode, RankBudget
from sidestep.analysis.fisher_map import MAP_FILENAME
from sidestep.errors import ConfigError
from sidestep.objective import parse_focus

__all__ = ["AnalysisConfig", "RankSignal", "REFERENCE_MAX_SAMPLES", "SKETCH_OVERSAMPLING"]

REFERENCE_MAX_SAMPLES = 50  # the reference analyses at most 50 samples per run
SKETCH_OVERSAMPLING = 16  # k = rank_max + 16 (docs/algorithm.md §7)


class RankSignal(str, Enum):
    """The second factor of the size signal s_m = sqrt((F/med F)·(X/med X)) (docs/algorithm.md §4)."""

    DATA = "data"  # data rank of the gradient sketch
    FISHER = "fisher"  # Fisher score alone
    WEIGHT = "weight"  # the reference's weight effective rank
    GRAD_ENERGY = "grad-energy"  # mean-gradient energy |sum G|^2 / numel, estimated from the sketch
    NEED = "need"  # unbiased need (noise removed) per parameter; selects and sizes on its own (water-filling)
    PROBE = "probe"  # share of a short flat LoRA probe's loss fall per module; selects and sizes on its own


REFERENCE_RANK_MAX = 128  # the reference's --rank-max, which its median budget is built around
FLAT_HEADROOM = 4  # under --budget flat: a cap of 2 × --rank halved the planted benchmark's gain, 4 × lost none


def default_rank_max(budget: object, base_rank: object) -> int:
    """--rank-max when none is given: the reference's 128, or under --budget flat 4 × --rank when that is more,
    so the flat budget can reach the modules that ask for most (docs/data-awareness.md, "--rank-max")."""
    flat = str(getattr(budget, "value", budget)) == BudgetMode.FLAT.value
    if flat and isinstance(base_rank, int) and not isinstance(base_rank, bool):
        return max(REFERENCE_RANK_MAX, FLAT_HEADROOM * base_rank)
    return REFERENCE_RANK_MAX


@dataclass(frozen=True)
class AnalysisConfig:
    """One analysis run. `None` for runs / batches_per_run means the reference rule (see `runs_for`)."""

    dataset_dir: Path
    output: Path | None = field(default=None, metadata={"help": "Map file (default: <dataset-dir>/fisher_map.json)."})
    timestep_focus: str = field(default="balanced", metadata={"help": "balanced, texture, structure or LOW,HIGH."})
    base_rank: int = field(default=64, metadata={"help": "Median rank of the adapted modules."})
    rank_min: int = field(default=16, metadata={"help": "Smallest rank of any adapted module."})
    rank_max: int | None = field(default=None, metadata={"help": "Largest rank of any adapted module (default 128; "
                                                         "under --budget flat 4 × --rank when that is more)."})
    rank_step: int | None = field(default=None, metadata={"help": "Rank grid (default 8, smaller when rank-min < 8)."})
    budget: BudgetMode = field(default=BudgetMode.MEDIAN, metadata={"help": "median: median rank = --rank; flat: "
                                                                    "total parameters = flat LoRA at --rank."})
    alpha_ratio: float = field(default=2.0, metadata={"help": "alpha = ratio × rank."})
    rank_signal: RankSignal = field(default=RankSignal.PROBE, metadata={"help": "What selects and sizes the modules."})
    runs: int | None = field(default=None, metadata={"help": "Estimation runs (default 2 if <= 10 samples, else 3)."})
    batches_per_run: int | None = field(default=None, metadata={"help": "Batches per run (default: up to 50 samples)."})
    convergence_patience: int = field(default=5, metadata={"help": "Stop a run once stable for this many batches."})
    convergence_threshold: float = field(default=0.98, metadata={"help": "Spearman correlation that counts as stable."})
    seed: int = field(default=42, metadata={"help": "Seeds subsets, noise, timesteps and sketches."})
    weight_rank: bool = field(default=True, metadata={"help": "Also measure each weight's effective rank (SVD)."})
    inclusion: float = field(default=0.55, metadata={"help": "Fraction of modules selected by Fisher score."})
    category_floor: float = field(default=0.10, metadata={"help": "Least fraction of each category kept."})
    data_rank_energy: float = field(default=0.9, metadata={"help": "Sketch energy fraction defining the data rank."})
    allow_turbo: bool = field(default=False, metadata={"help": "Analyse a turbo model despite its fragility."})
    skip_bad: bool = field(default=False, metadata={"help": "Leave unreadable samples out instead of stopping."})
    keep_sketches: bool = field(default=False, metadata={"help": "Keep the gradient sketches (init bases) in memory."})
    write_init: bool = field(default=True, metadata={"help": "Write fisher_init.safetensors (gradient-aligned LoRA "
                                                     "init bases) beside the map."})
    probe_steps: int = field(default=40, metadata={"help": "--rank-signal probe: training steps of the flat LoRA probe."})
    probe_rank: int = field(default=8, metadata={"help": "--rank-signal probe: rank of the probe on every module."})
    probe_lr: float = field(default=1e-2, metadata={"help": "--rank-signal probe: learning rate of the probe (Adam)."})
    probe_repeats: int = field(default=1, metadata={"help": "--rank-signal probe: independent probes averaged (a map "
                                                    "that depends less on --seed, at this many times the cost)."})
    focus_label: str = field(init=False, default="balanced")
    focus_range: tuple[float, float] = field(init=False, default=(0.0, 1.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_dir", Path(self.dataset_dir))
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        label, span = parse_focus(str(self.timestep_focus))
        object.__setattr__(self, "focus_label", label)
        object.__setattr__(self, "focus_range", span)
        try:
            object.__setattr__(self, "rank_signal", RankSignal(self.rank_signal))
        except ValueError:
            choices = ", ".join(s.value for s in RankSignal)
            raise ConfigError(f"--rank-signal {self.rank_signal!r} is not one of: {choices}.") from None
        if self.rank_max is None:
            object.__setattr__(self, "rank_max", default_rank_max(self.budget, self.base_rank))
        self.rank_budget  # validates ranks, step, budget mode, alpha ratio, inclusion and floor
        object.__setattr__(self, "budget", self.rank_budget.mode)
        for flag, value in (("--runs", self.runs), ("--batches-per-run", self.batches_per_run)):
            if value is not None and not _positive_int(value):
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}.")
        if not _positive_int(self.convergence_patience):
            raise ConfigError(f"--convergence-patience must be a positive integer, got {self.convergence_patience!r}.")
        if not (_number(self.convergence_threshold) and 0 < self.convergence_threshold <= 1):
            raise ConfigError(f"--convergence-threshold must be in (0, 1], got {self.convergence_threshold!r}.")
        if not (_number(self.data_rank_energy) and 0 < self.data_rank_energy <= 1):
            raise ConfigError(f"--data-rank-energy must be in (0, 1], got {self.data_rank_energy!r}.")
        for flag, value in (("--probe-steps", self.probe_steps), ("--probe-rank", self.probe_rank),
                            ("--probe-repeats", self.probe_repeats)):
            if not _positive_int(value):
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}.")
        if not (_number(self.probe_lr) and 0 < self.probe_lr < 1):
            raise ConfigError(f"--probe-lr must be in (0, 1), got {self.probe_lr!r}.")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63):
            raise ConfigError(f"--seed must be an integer in [0, 2^63), got {self.seed!r}.")

    @property
    def rank_budget(self) -> RankBudget:
        """The validated rank budget handed to the allocator."""
        return RankBudget(base=self.base_rank, lo=self.rank_min, hi=self.rank_max, step=self.rank_step,
                          mode=self.budget, alpha_ratio=self.alpha_ratio, inclusion=self.inclusion,
                          category_floor=self.category_floor)

    @property
    def output_path(self) -> Path:
        """Where the map goes: `--output`, or fisher_map.json inside the dataset folder."""
        return self.output if self.output is not None else self.dataset_dir / MAP_FILENAME

    @property
    def sketch_k(self) -> int:
        """Sketch width before the per-module cap at min(in, out): rank_max + 16."""
        return self.rank_max + SKETCH_OVERSAMPLING

    def runs_for(self, samples: int) -> int:
        """`--runs`, or the reference rule: 2 runs for up to 10 samples, else 3."""
        return self.runs if self.runs is not None else (2 if samples <= 10 else 3)

    def batches_for(self, samples: int) -> int:
        """`--batches-per-run`, or the reference rule: every sample once, at most 50."""
        return self.batches_per_run if self.batches_per_run is not None else min(samples, REFERENCE_MAX_SAMPLES)

    def subset_size(self, samples: int) -> int:
        """Distinct samples a run draws from (it cycles through them when it needs more batches)."""
        return min(samples, self.batches_for(samples))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
