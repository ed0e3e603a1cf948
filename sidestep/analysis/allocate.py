"""Pure rank-allocation math for Preprocessing++: which modules get an adapter, and at what rank.

Choices where docs/algorithm.md §4 leaves room:
- Selection keeps `ceil(inclusion · n)` modules (so any inclusion > 0 keeps at least one), then lifts each
  category to `ceil(category_floor · members)` (min 1). Ties in score break by name.
- Rank step: `--rank-step` if given (it must divide `--rank`); otherwise 8, or the largest power of two
  <= `--rank-min` when that is below 8, then reduced to gcd(step, base) so `--rank` is always on the grid.
  Allowed ranks are the multiples of the step inside [`--rank-min`, `--rank-max`]; the bounds themselves
  need not be multiples.
- Rounding to the step is half-up (never Python's banker's rounding), so it is the same on every platform.
- Median mode, even count: both middle modules (by signal, then name) get exactly `base`, those below
  are capped at `base` and those above raised to `base`, so `statistics.median(ranks) == base`.
- Flat mode: bisection on the scale, then largest-remainder fix-up moves of one step (see `_next_move`);
  if even every module at `--rank-max` cannot spend the budget, all of them get `--rank-max`.
- Flat mode by water-filling (`water_fill_ranks`: the need's spectrum; `saturating_ranks`: the probe's loss
  shares with a gain that saturates with rank, docs/data-awareness.md): one step at a time to the largest
  gain per parameter, no selection rule, the total within one step of the flat budget.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping, Sequence

from sidestep.analysis.modules import Category, ModuleShape, category_of
from sidestep.errors import ConfigError

__all__ = [
    "Allocation",
    "BudgetMode",
    "RankBudget",
    "allocate_ranks",
    "concentration",
    "water_fill_ranks",
    "random_permutation_control",
    "saturating_ranks",
    "select_modules",
    "size_signal",
]

DEFAULT_STEP = 8  # tensor-core friendly
_EPS = 1e-9  # keeps ceil(0.55 * 20) at 11 despite 0.55 * 20 == 11.000000000000002


class BudgetMode(str, Enum):
    """How the ranks are scaled."""

    MEDIAN = "median"  # the median assigned rank is exactly --rank
    FLAT = "flat"  # the total LoRA parameters equal a flat --rank on every target


@dataclass(frozen=True, slots=True)
class RankBudget:
    """The user's rank budget, validated once here.

    Args:
        base: `--rank`, the median rank (median mode) or the flat rank whose parameter count is spent (flat mode).
        lo, hi: `--rank-min`, `--rank-max`: the range of any assigned rank.
        step: `--rank-step`; None picks the default rule (see the module docstring and `effective_step`).
        mode: `--budget`, median or flat.
        alpha_ratio: `--alpha-ratio`, alpha = round(alpha_ratio · rank).
        inclusion: fraction of the targets selected by Fisher score.
        category_floor: minimum fraction of each category kept (min 1 module).
    """

    base: int = 64
    lo: int = 16
    hi: int = 128
    step: int | None = None
    mode: BudgetMode = BudgetMode.MEDIAN
    alpha_ratio: float = 2.0
    inclusion: float = 0.55
    category_floor: float = 0.10

    def __post_init__(self) -> None:
        for flag, value in (("--rank", self.base), ("--rank-min", self.lo), ("--rank-max", self.hi)):
            if not _is_positive_int(value):
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}.")
        if self.lo > self.hi:
            raise ConfigError(f"--rank-min {self.lo} is above --rank-max {self.hi}; lower one or raise the other.")
        if not self.lo <= self.base <= self.hi:
            bound = f"--rank-min {self.base}" if self.base < self.lo else f"--rank-max {self.base}"
            raise ConfigError(f"--rank {self.base} is outside --rank-min {self.lo}..--rank-max {self.hi}; pick a rank in "
                              f"that range or pass {bound}.")
        if self.step is not None and (not _is_positive_int(self.step) or self.base % self.step):
            raise ConfigError(f"--rank-step {self.step!r} must be a positive integer dividing --rank {self.base}.")
        try:
            object.__setattr__(self, "mode", BudgetMode(self.mode))  # accept the plain string too
        except ValueError:
            raise ConfigError(f"--budget {self.mode!r} is not one of: median, flat.") from None
        if not (isinstance(self.alpha_ratio, (int, float)) and math.isfinite(self.alpha_ratio) and self.alpha_ratio > 0):
            raise ConfigError(f"--alpha-ratio must be a number above 0, got {self.alpha_ratio!r}.")
        if not (isinstance(self.inclusion, (int, float)) and 0 < self.inclusion <= 1):
            raise ConfigError(f"--inclusion must be in (0, 1], got {self.inclusion!r}.")
        if not (isinstance(self.category_floor, (int, float)) and 0 <= self.category_floor <= 1):
            raise ConfigError(f"--category-floor must be in [0, 1], got {self.category_floor!r}.")

    @property
    def effective_step(self) -> int:
        """The rank grid: 8, or a power of two <= `lo` when `lo` < 8, reduced so that `base` is a multiple."""
        if self.step is not None:
            return self.step
        step = DEFAULT_STEP if self.lo >= DEFAULT_STEP else 1 << (self.lo.bit_length() - 1)
        return math.gcd(step, self.base)

    @property
    def rank_range(self) -> tuple[int, int]:
        """The smallest and largest allowed rank: multiples of the step inside [lo, hi]; both bracket `base`."""
        step = self.effective_step
        return -(-self.lo // step) * step, (self.hi // step) * step


@dataclass(frozen=True, slots=True)
class Allocation:
    """Ranks and alphas per adapted module, plus what the allocation costs.

    Args:
        ranks, alphas: per adapted module (original names), in the order of the signal given.
        dropped: selected modules left without an adapter because their rank fell below `--rank-min` (flat mode).
        trainable_params: Σ rank·(in+out) over the adapted modules.
        flat_equivalent_params: base·Σ(in+out) over every targetable module: what a flat LoRA would cost.
    """

    ranks: dict[str, int]
    alphas: dict[str, int]
    dropped: tuple[str, ...]
    trainable_params: int
    flat_equivalent_params: int


def select_modules(scores: Mapping[str, float], inclusion: float = 0.55, category_floor: float = 0.10) -> list[str]:
    """The top `inclusion` fraction of modules by score, each category lifted to its floor; best first.

    Args:
        scores: Fisher score per targetable module (original names, needed for the category when the floor is > 0).
        inclusion: fraction kept, rounded up.
        category_floor: each category keeps at least this fraction of its members, rounded up, and at least one.
    """
    if not 0 < inclusion <= 1 or not 0 <= category_floor <= 1:
        raise ValueError(f"inclusion {inclusion} must be in (0, 1] and category_floor {category_floor} in [0, 1].")
    _check_values(scores, "score")
    order = sorted(scores, key=lambda name: (-scores[name], name))
    chosen = set(order[: math.ceil(inclusion * len(order) - _EPS)])
    if category_floor > 0:
        for category in Category:
            members = [name for name in order if category_of(name) is category]
            need = max(1, math.ceil(category_floor * len(members) - _EPS)) if members else 0
            missing = need - sum(name in chosen for name in members)
            chosen.update([name for name in members if name not in chosen][: max(0, missing)])
    return [name for name in order if name in chosen]


def size_signal(fisher: Mapping[str, float], other: Mapping[str, float] | None = None) -> dict[str, float]:
    """s_m = sqrt((F_m / med F) · (R_m / med R)) with a second signal R, else F_m / med F (medians over the keys).

    Args:
        fisher: Fisher score per selected module.
        other: data rank, weight effective rank or another signal for the same modules; None for Fisher alone.
    """
    relative_fisher = _relative(fisher, "fisher score")
    if other is None:
        return relative_fisher
    if set(other) != set(fisher):
        raise ValueError("the second rank signal must cover exactly the modules of the Fisher scores.")
    relative_other = _relative(other, "rank signal")
    return {name: math.sqrt(relative_fisher[name] * relative_other[name]) for name in fisher}


def allocate_ranks(
    signal: Mapping[str, float],
    shapes: Mapping[str, ModuleShape],
    budget: RankBudget,
    all_shapes: Mapping[str, ModuleShape] | None = None,
) -> Allocation:
    """Give each selected module a rank from its size signal, under the median or flat budget.

    Args:
        signal: size signal per selected module (see `size_signal`); only ratios to its median matter.
        shapes: shape of every selected module.
        budget: the validated rank budget.
        all_shapes: shape of every targetable module (defaults to `shapes`); sets the flat budget.
    """
    missing = sorted(name for name in signal if name not in shapes)
    if missing:
        raise ValueError(f"no shape given for {len(missing)} module(s), e.g. {missing[0]!r}.")
    all_shapes = shapes if all_shapes is None else all_shapes
    relative = _relative(signal, "size signal")
    if budget.mode is BudgetMode.MEDIAN:
        ranks, dropped = _median_ranks(relative, budget), ()
    else:
        ranks, dropped = _flat_ranks(relative, shapes, all_shapes, budget)
    return Allocation(
        ranks=ranks,
        alphas={name: max(1, _round_half_up(budget.alpha_ratio * rank)) for name, rank in ranks.items()},
        dropped=dropped,
        trainable_params=sum(shapes[name].lora_params(rank) for name, rank in ranks.items()),
        flat_equivalent_params=sum(shape.lora_params(budget.base) for shape in all_shapes.values()),
    )


def water_fill_ranks(
    spectra: Mapping[str, Sequence[float]],
    shapes: Mapping[str, ModuleShape],
    budget: RankBudget,
) -> Allocation:
    """Spend the flat parameter budget one rank step at a time where the need per parameter is largest.

    Args:
        spectra: per targetable module, the need's eigenvalues, largest first (energy per direction; values
            <= 0 are noise). A rank-r adapter can follow the first r of them, so moving a module from rank a to
            rank b gains Σ_{a <= j < b} max(λ_j, 0) and costs (b − a)·(in + out) parameters.
        shapes: the shape of every module in `spectra`.
        budget: its flat budget (base · Σ(in+out) over `shapes`), step and bounds are respected; a module enters
            at the smallest allowed rank and then grows by one step.

    A module's gains per parameter only shrink as it grows (the eigenvalues are sorted), so taking the best
    move each time is the greedy solution of this concave budget problem. Modules whose need is all noise
    never enter while another move still gains. When every gain is spent before the budget is (a need that
    lives in fewer directions than the budget buys), the rest goes to the modules with the most need per
    parameter, so the total always lands within one step of the largest module of the flat budget; among
    modules with no positive gain left, a larger raw signal (Σ λ per parameter, a negative or non-finite one
    lowest) goes first, so a signal of 0 is preferred to a negative one and the module's name never decides.
    """
    missing = sorted(name for name in spectra if name not in shapes)
    if missing:
        raise ValueError(f"no shape given for {len(missing)} module(s), e.g. {missing[0]!r}.")
    step, (lo, hi) = budget.effective_step, budget.rank_range
    size = {name: shapes[name].in_features + shapes[name].out_features for name in spectra}
    gains = {name: [max(float(v), 0.0) if math.isfinite(v) else 0.0 for v in values] for name, values in spectra.items()}
    target = budget.base * sum(size.values())
    need = {name: sum(values) / size[name] for name, values in gains.items()}
    raw = {name: _finite_or_lowest(math.fsum(values)) / size[name] for name, values in spectra.items()}
    ranks = dict.fromkeys(spectra, 0)
    spent = 0

    def move(name: str) -> tuple[float, int] | None:
        start = ranks[name]
        end = lo if start == 0 else start + step
        if end > hi:
            return None
        cost = (end - start) * size[name]
        return sum(gains[name][start:end]) / cost, cost

    while spent < target:
        options = [(m[0], need[name], raw[name], name, m[1]) for name in sorted(spectra) if (m := move(name)) is not None]
        if not options:
            break
        gain, _, _, name, cost = max(options, key=lambda o: (o[0] > 0, o[0], o[1], o[2], o[3]))
        if spent + cost - target > target - spent:  # overshooting more than stopping short: stop here
            break
        ranks[name] = lo if ranks[name] == 0 else ranks[name] + step
        spent += cost
    ranks = {name: rank for name, rank in ranks.items() if rank}
    order = sorted(ranks, key=lambda n: (-need[n], n))
    return Allocation(
        ranks={name: ranks[name] for name in order},
        alphas={name: max(1, _round_half_up(budget.alpha_ratio * ranks[name])) for name in order},
        dropped=(),
        trainable_params=sum(shapes[name].lora_params(rank) for name, rank in ranks.items()),
        flat_equivalent_params=target,
    )


def saturating_ranks(shares: Mapping[str, float], shapes: Mapping[str, ModuleShape], budget: RankBudget,
                     scale: float) -> Allocation:
    """Water-fill the flat budget on loss shares whose gain saturates with rank.

    Args:
        shares: per targetable module, the loss its fix removes (values <= 0, or not finite, are nothing).
        shapes: the shape of every module in `shares`; the flat budget is `budget.base` on all of them.
        budget: the validated flat budget (step and bounds respected, as in `water_fill_ranks`).
        scale: how many ranks it takes for a module's remaining gain to fall e-fold (> 0).

    Rank r of module m is modelled to gain share_m · (1 − e^(−r/scale)): every rank step removes the same
    fraction of what is left. Water-filling that gives each module a rank that grows with the *logarithm* of
    its share per parameter, so a module that holds ten times the share gets scale·ln 10 more rank, not ten
    times the rank: a share says how much loss a module's fix removes, not how many directions the fix needs.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number of ranks, got {scale!r}.")
    decay = math.exp(-1.0 / scale)
    length = budget.rank_range[1]
    # water_fill_ranks counts a gain <= 0 or not finite as nothing, so such a share enters only when every
    # positive one is at rank_max and the budget is not yet spent
    spectra = {name: [share * (1 - decay) * decay ** j for j in range(length)] for name, share in shares.items()}
    return water_fill_ranks(spectra, shapes, budget)


def concentration(need: Mapping[str, float], fraction: float = 0.10) -> float:
    """Share of the total need (negative values as 0) held by the top `fraction` of modules (at least one).

    1/n·ceil(fraction·n) means spread evenly; near 1 means a few modules hold all of it.
    """
    values = sorted((max(v, 0.0) for v in need.values()), reverse=True)
    total = sum(values)
    if not values or total <= 0:
        return 0.0
    return sum(values[: max(1, math.ceil(fraction * len(values) - _EPS))]) / total


def random_permutation_control(allocation: Allocation, seed: int) -> dict[str, int]:
    """The same rank histogram shuffled over the same modules: the benchmark's control arm."""
    names = sorted(allocation.ranks)
    ranks = [allocation.ranks[name] for name in names]
    random.Random(seed).shuffle(ranks)
    return dict(zip(names, ranks))


# ---- helpers ---------------------------------------------------------------------------------------


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_or_lowest(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _check_values(values: Mapping[str, float], what: str) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{what} of {name} is {value!r}; expected a finite number >= 0.")


def _relative(values: Mapping[str, float], what: str) -> dict[str, float]:
    """Each value divided by the median; no information at all (every value 0) means equal signals."""
    _check_values(values, what)
    positive = [v for v in values.values() if v > 0]
    if not positive:
        return {name: 1.0 for name in values}
    median = statistics.median(values.values())
    # With half or more of the values at 0 the median is 0; the mean of the rest still gives a scale.
    scale = median if median > 0 else statistics.fmean(positive)
    return {name: value / scale for name, value in values.items()}


def _median_ranks(relative: Mapping[str, float], budget: RankBudget) -> dict[str, int]:
    step, (lo, hi) = budget.effective_step, budget.rank_range
    ranks = {name: min(max(_round_half_up(budget.base * r / step) * step, lo), hi) for name, r in relative.items()}
    order = sorted(relative, key=lambda name: (relative[name], name))
    low_mid, high_mid = (len(order) - 1) // 2, len(order) // 2
    for i, name in enumerate(order):
        # Pin the middle at base and keep the order around it, so the median is base whatever the rounding did.
        if low_mid <= i <= high_mid:
            ranks[name] = budget.base
        elif i < low_mid:
            ranks[name] = min(ranks[name], budget.base)
        else:
            ranks[name] = max(ranks[name], budget.base)
    return ranks


def _flat_ranks(
    relative: Mapping[str, float],
    shapes: Mapping[str, ModuleShape],
    all_shapes: Mapping[str, ModuleShape],
    budget: RankBudget,
) -> tuple[dict[str, int], tuple[str, ...]]:
    if not relative:
        return {}, ()
    step, (lo, hi) = budget.effective_step, budget.rank_range
    size = {name: shapes[name].in_features + shapes[name].out_features for name in relative}
    target = budget.base * sum(shape.in_features + shape.out_features for shape in all_shapes.values())
    tolerance = step * max(size.values())

    def ranks_at(scale: float) -> dict[str, int]:
        snapped = {name: _round_half_up(scale * budget.base * r / step) * step for name, r in relative.items()}
        # Below --rank-min a module is dropped rather than inflated to the minimum.
        return {name: 0 if rank < budget.lo else min(rank, hi) for name, rank in snapped.items()}

    def total(ranks: Mapping[str, int]) -> int:
        return sum(rank * size[name] for name, rank in ranks.items())

    reachable = hi * sum(size[name] for name, r in relative.items() if r > 0)  # a zero signal never enters
    scale = _bisect_scale(lambda c: total(ranks_at(c)), target, ceiling=reachable)
    ideal = {name: scale * budget.base * r for name, r in relative.items()}
    ranks = _fix_up(ranks_at(scale), ideal, total, target, tolerance, (step, lo, hi))
    return {n: r for n, r in ranks.items() if r}, tuple(n for n, r in ranks.items() if not r)


def _bisect_scale(total_at: Callable[[float], int], target: int, ceiling: int) -> float:
    """The scale whose total is closest to `target`; total_at is a non-decreasing step function of the scale."""
    below, above = 0.0, 1.0
    for _ in range(2000):  # doubling reaches float's range long before this
        reached = total_at(above)
        if reached >= target or reached >= ceiling or above > 1e300:
            break
        below, above = above, above * 2
    if total_at(above) < target:
        return above  # even the ceiling cannot spend the budget: everything that can be is at --rank-max
    for _ in range(200):
        middle = (below + above) / 2
        if not below < middle < above:
            break
        reached = total_at(middle)
        if reached == target:
            return middle
        below, above = (middle, above) if reached < target else (below, middle)
    return below if target - total_at(below) <= total_at(above) - target else above


def _fix_up(
    ranks: Mapping[str, int],
    ideal: Mapping[str, float],
    total: Callable[[Mapping[str, int]], int],
    target: int,
    tolerance: int,
    grid: tuple[int, int, int],
) -> dict[str, int]:
    """Move one step at a time until |total − target| <= tolerance; returns the closest allocation seen."""
    step, lo, hi = grid
    ranks = dict(ranks)
    best, best_gap = dict(ranks), abs(target - total(ranks))
    for _ in range(2 * len(ranks) * (hi // step + 1) + 8):
        gap = target - total(ranks)
        if abs(gap) <= tolerance:
            return ranks
        move = _next_move(ranks, ideal, gap > 0, grid)
        if move is None:
            break
        ranks[move[0]] = move[1]
        if abs(target - total(ranks)) < best_gap:
            best, best_gap = dict(ranks), abs(target - total(ranks))
    return best


def _next_move(
    ranks: Mapping[str, int], ideal: Mapping[str, float], grow: bool, grid: tuple[int, int, int]
) -> tuple[str, int] | None:
    """Largest remainder first: one step to the module furthest below its ideal rank (or off the one furthest above).

    A step moves the total by at most the tolerance, so from outside it a step never overshoots to the other
    side. Only when no module can step does a dropped module enter at the minimum (or the weakest one leave).
    Keeps the ranks in signal order: a module never passes one with a larger ideal rank.
    """
    step, lo, hi = grid
    if grow:
        movable = [n for n, r in ranks.items() if 0 < r < hi]
        if movable:
            name = min(movable, key=lambda n: (ranks[n] - ideal[n], -ideal[n], n))
            return name, ranks[name] + step
        entering = [n for n, r in ranks.items() if r == 0]
        return (min(entering, key=lambda n: (-ideal[n], n)), lo) if entering else None
    movable = [n for n, r in ranks.items() if r > lo]
    if movable:
        name = min(movable, key=lambda n: (ideal[n] - ranks[n], ideal[n], n))
        return name, ranks[name] - step
    leaving = [n for n, r in ranks.items() if r > 0]
    return (min(leaving, key=lambda n: (ideal[n], n)), 0) if leaving else None
