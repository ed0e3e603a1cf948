"""The benchmark's arms: which modules each adapts, at what rank and alpha, at a parameter budget matched to flat.

Numbering follows issue 10: (1) flat, (2) reference rule, (3) our map / median mode, (4) our map / flat budget,
(5) random permutation of (4), (6) flat + gradient init, (7) map + gradient init, (8) rsLoRA versions of (1), (4);
(4h) is map (4) trained as `sidestep train` trains a map by default: at the flat rate scaled by MAP_LR_RATIO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

from sidestep.analysis.config import FLAT_HEADROOM
from sidestep.analysis.fisher_map import ADVISED_LR
from sidestep.analysis.modules import ModuleShape
from sidestep.training.config import DEFAULT_LR

from .allocation import match_budget, params_of, permuted, reference_ranks

ARM_ORDER = ("flat", "reference", "map_median", "map_flat", "map_flat_product_lr", "control", "flat_grad", "map_grad",
             "flat_rslora", "map_flat_rslora")
# `sidestep train` without --lr trains a map at ADVISED_LR instead of DEFAULT_LR; arm (4h) applies the same ratio
# to the rate flat LoRA chose on validation, as a user who tuned flat LoRA and then switched to a map would get
MAP_LR_RATIO = float(ADVISED_LR) / DEFAULT_LR
ARM_LABELS = {
    "flat": "(1) flat LoRA, all targets",
    "reference": "(2) reference rule (Side-Step)",
    "map_median": "(3) our map, median mode",
    "map_flat": "(4) our map, --budget flat",
    "map_flat_product_lr": "(4h) map (4) at flat's best LR × 0.5 (train's default with a map)",
    "control": "(5) control: permuted (4)",
    "flat_grad": "(6) flat + gradient init",
    "map_grad": "(7) map (4) + gradient init",
    "flat_rslora": "(8a) flat, rsLoRA scaling",
    "map_flat_rslora": "(8b) map (4), rsLoRA scaling",
}


@dataclass(frozen=True)
class Budget:
    base: int  # flat rank; median rank of the maps
    lo: int
    hi: int
    step: int
    alpha_ratio: float = 2.0
    flat_hi: int | None = None  # --rank-max of the maps analysed under --budget flat; None = FLAT_HEADROOM × base

    @property
    def flat_cap(self) -> int:
        """The cap a `--budget flat` analysis gets: the product's default ratio to the flat rank unless given."""
        return self.flat_hi if self.flat_hi is not None else FLAT_HEADROOM * self.base

    def for_flat_maps(self) -> Budget:
        """This budget with room for the flat-budget maps' ranks (their arms are matched within these bounds)."""
        return replace(self, hi=max(self.hi, self.flat_cap))


@dataclass(frozen=True)
class Arm:
    key: str
    ranks: dict[str, int]  # adapted modules (original names) -> rank
    alphas: dict[str, float]
    params: int  # Σ r·(in+out) of what is trained
    native_params: int  # the same before budget matching (differs only when the arm had to be rescaled)
    flat: bool = False  # trained as plain flat LoRA (TrainConfig rank/alpha, --ignore-fisher-map)
    init: str = "default"
    notes: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return ARM_LABELS[self.key]

    def describe(self) -> dict:
        hist: dict[int, int] = {}
        for r in self.ranks.values():
            hist[r] = hist.get(r, 0) + 1
        return {"arm": self.key, "label": self.label, "params": self.params, "native_params": self.native_params,
                "modules": len(self.ranks), "rank_histogram": {str(k): v for k, v in sorted(hist.items())},
                "init": self.init, "notes": list(self.notes)}


def rslora_alphas(ranks: Mapping[str, int], base: int, ratio: float) -> dict[str, float]:
    """rsLoRA scaling γ_m = α/√r_m with one α = ratio·base for every module.

    Plain LoRA scales by alpha_m/r_m, so alpha_m = α·√r_m gives exactly γ_m without a use_rslora switch.
    """
    alpha = ratio * base
    return {n: round(alpha * math.sqrt(r), 6) for n, r in ranks.items()}


def flat_arm(shapes: Mapping[str, ModuleShape], budget: Budget, key: str = "flat", init: str = "default") -> Arm:
    ranks = dict.fromkeys(shapes, budget.base)
    if key == "flat_rslora":
        alphas = rslora_alphas(ranks, budget.base, budget.alpha_ratio)
    else:
        alphas = dict.fromkeys(shapes, budget.alpha_ratio * budget.base)
    p = params_of(ranks, shapes)
    return Arm(key, ranks, alphas, p, p, flat=True, init=init)


def matched_arm(key: str, native: Mapping[str, int], shapes: Mapping[str, ModuleShape], budget: Budget,
                target: int, init: str = "default", rslora: bool = False, notes: tuple[str, ...] = ()) -> Arm:
    """An arm from a native rank map, rescaled (shape kept) only when it is off the flat budget by > 1%."""
    ranks = match_budget(native, shapes, target, budget.step, budget.lo, budget.hi, tolerance=0.01)
    native_p, p = params_of(native, shapes), params_of(ranks, shapes)
    if ranks != dict(native):
        notes = notes + (f"rescaled from {native_p} to {p} parameters to match flat ({target})",)
    if rslora:
        alphas = rslora_alphas(ranks, budget.base, budget.alpha_ratio)
    else:
        alphas = {n: budget.alpha_ratio * r for n, r in ranks.items()}
    return Arm(key, ranks, alphas, p, native_p, init=init, notes=notes)


def reference_native(fisher: Mapping[str, float], weight_rank: Mapping[str, float], budget: Budget) -> dict[str, int]:
    return reference_ranks(fisher, weight_rank, budget.base, budget.lo, budget.hi, budget.step)


def control_native(ranks: Mapping[str, int], seed: int) -> dict[str, int]:
    return permuted(ranks, seed)
