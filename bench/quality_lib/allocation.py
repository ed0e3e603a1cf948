"""Rank maps of the bench's arms that the library does not make itself, and parameter-budget matching.

- `reference_ranks`: the reference (Side-Step) rule, written here from the reference tool's description
  "What the analysis computes": top 55% by Fisher + 10% category floor, rank = base·sqrt((F/med F)(S/med S))
  with S the weight effective rank, rounded to the rank step and clamped; alpha = 2·rank.
- `match_budget`: scale a rank map (shape preserved) until Σ r·(in+out) is within a tolerance of a target.
- `permuted`: the control, a seeded shuffle of a rank histogram over the same modules.
- `scattered`: the same histogram on randomly drawn modules (the planted bench's second control).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Mapping, Sequence

from sidestep.analysis.modules import Category, ModuleShape, category_of


def params_of(ranks: Mapping[str, int], shapes: Mapping[str, ModuleShape]) -> int:
    """Trainable LoRA parameters, exactly Σ r_m·(in_m + out_m)."""
    return sum(int(r) * (shapes[n].in_features + shapes[n].out_features) for n, r in ranks.items())


def reference_ranks(fisher: Mapping[str, float], weight_rank: Mapping[str, float], base: int, lo: int, hi: int,
                    step: int, inclusion: float = 0.55, floor: float = 0.10) -> dict[str, int]:
    """The reference rule. Spec-silent choices: ceil for the 55% count, medians over the selected modules."""
    order = sorted(fisher, key=lambda n: (-fisher[n], n))
    chosen = set(order[: max(1, math.ceil(inclusion * len(order) - 1e-9))])
    for cat in Category:
        members = [n for n in order if category_of(n) is cat]
        need = max(1, math.ceil(floor * len(members) - 1e-9)) if members else 0
        for n in [m for m in members if m not in chosen][: max(0, need - sum(m in chosen for m in members))]:
            chosen.add(n)
    sel = [n for n in order if n in chosen]
    med_f = statistics.median(fisher[n] for n in sel) or 1.0
    med_s = statistics.median(weight_rank[n] for n in sel) or 1.0
    out = {}
    for n in sel:
        raw = base * math.sqrt((fisher[n] / med_f) * (weight_rank[n] / med_s))
        out[n] = min(max(_round_to(raw, step), lo), hi)
    return out


def permuted(ranks: Mapping[str, int], seed: int) -> dict[str, int]:
    """The same multiset of ranks shuffled over the same modules (seeded)."""
    names = sorted(ranks)
    values = [ranks[n] for n in names]
    random.Random(seed).shuffle(values)
    return dict(zip(names, values))


def scattered(ranks: Mapping[str, int], names: Sequence[str], seed: int) -> dict[str, int]:
    """The same multiset of ranks on as many modules drawn at random from `names` (seeded): what the ranks are
    worth without the choice of modules."""
    values = list(ranks.values())
    rng = random.Random(seed)
    rng.shuffle(values)
    return dict(zip(sorted(rng.sample(sorted(names), len(values))), values))


def match_budget(ranks: Mapping[str, int], shapes: Mapping[str, ModuleShape], target: int, step: int, lo: int,
                 hi: int, tolerance: float = 0.005) -> dict[str, int]:
    """`ranks` if already within `tolerance` of `target` parameters; else the same shape rescaled to it.

    Bisection on a common scale c of the ideal ranks c·r_m (rounded to `step`, clamped to [lo, hi]), then
    single-step moves on the module furthest from its ideal until the total is within tolerance.
    """
    if abs(params_of(ranks, shapes) / target - 1) <= tolerance:
        return dict(ranks)
    size = {n: shapes[n].in_features + shapes[n].out_features for n in ranks}

    def at(c: float) -> dict[str, int]:
        return {n: min(max(_round_to(c * r, step), lo), hi) for n, r in ranks.items()}

    low, high = 0.0, 1.0
    while params_of(at(high), shapes) < target and high < 1e6:
        low, high = high, high * 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if params_of(at(mid), shapes) < target else (low, mid)
    c = high if abs(params_of(at(high), shapes) - target) < abs(params_of(at(low), shapes) - target) else low
    out = at(c)
    for _ in range(10 * len(out)):
        gap = target - params_of(out, shapes)
        if abs(gap) <= tolerance * target:
            break
        grow = gap > 0
        movable = [n for n in out if (out[n] + step <= hi if grow else out[n] - step >= lo)
                   and step * size[n] < 2 * abs(gap)]  # strictly closer, or two modules trade the gap forever
        if not movable:  # every single step overshoots: one module up and another down may still close the gap
            swap = _closer_swap(out, size, gap, step, lo, hi)
            if swap is None:
                break
            out[swap[0]] += step
            out[swap[1]] -= step
            continue
        err = {n: (c * ranks[n] - out[n]) * (1 if grow else -1) for n in movable}
        pick = max(movable, key=lambda n: (err[n], n))
        out[pick] += step if grow else -step
    return out


def _closer_swap(ranks: Mapping[str, int], size: Mapping[str, int], gap: int, step: int, lo: int,
                 hi: int) -> tuple[str, str] | None:
    """(up, down): the pair of one-step moves that leaves the smallest |gap|, if it is smaller than now."""
    ups = [n for n in ranks if ranks[n] + step <= hi]
    downs = [n for n in ranks if ranks[n] - step >= lo]
    pairs = [(abs(gap - step * (size[u] - size[d])), u, d) for u in ups for d in downs if u != d]
    best = min(pairs, default=None)
    return (best[1], best[2]) if best is not None and best[0] < abs(gap) else None


def _round_to(x: float, step: int) -> int:
    return int(math.floor(x / step + 0.5)) * step
