"""A base model with a known, concentrated, high-rank change: where a good map must put the adapter.

Construction ("reverse plant"): the teacher T is the quality benchmark's pretrained tiny DiT, and the dataset is
drawn from the very law T was pretrained on, so the teacher is consistent with its data by construction. The
base B that the user fine-tunes is T with a random rank-r_s change added to each of |S| planted modules s:
    W_s(B) = W_s(T) + c_s · U_s V_sᵀ · ||W_s(T)|| / √r_s       (U_s, V_s random orthonormal, r_s in [16, 48])
Each c_s is calibrated so that planting s ALONE raises the loss on the law by the same `damage` (every planted
module matters equally), capped at c_s <= `max_scale` (2: a change at most twice the weight's norm). Modules that
cannot reach the damage within the cap are too insensitive to plant and are never drawn: in the tiny base model
that is every cross-attention projection (the synthetic condition is read weakly; a change of twice the weight's
norm there moves the loss by < 0.0015) and a few others, so plants mix self-attention and MLP projections.
Restoring exactly the planted modules recovers T: the oracle arm. Everything is drawn from `plant_seed`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from sidestep.analysis.modules import Category, category_of, targetable_modules
from sidestep.models import original_to_diffusers

from quality_lib.base_model import MODEL_FOLDER, BaseModel, _write_original
from quality_lib.evaluate import EvalSet, eval_loss, make_eval_set
from quality_lib.synthetic import draw_samples

PLANT_VERSION = 2


@dataclass(frozen=True)
class PlantSpec:
    seed: int
    modules: int = 6  # |S|, two per category when possible
    damage: float = 0.004  # loss increase each planted module causes alone
    max_scale: float = 2.0  # a planted change is at most this multiple of the weight's norm
    rank_lo: int = 16
    rank_hi: int = 48


@dataclass(frozen=True)
class Plant:
    spec: PlantSpec
    root: Path  # checkpoint root of the planted base B (original layout, holds MODEL_FOLDER)
    ranks: dict[str, int]  # planted module -> true rank of its change
    scales: dict[str, float]  # the calibrated c_s
    eligible: tuple[str, ...]  # modules sensitive enough to be planted

    def describe(self) -> dict:
        return {"seed": self.spec.seed, "modules": dict(self.ranks), "scales": {k: round(v, 4) for k, v in self.scales.items()},
                "damage_each": self.spec.damage, "eligible": len(self.eligible)}


def _weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_modules())[original_to_diffusers(name)].weight


def _direction(weight: torch.Tensor, rank: int, g: torch.Generator) -> torch.Tensor:
    out, inp = weight.shape
    u = torch.linalg.qr(torch.randn(out, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inp, rank, generator=g))[0]
    return (u @ v.T) * (weight.norm() / rank**0.5)


def _damage(teacher: torch.nn.Module, name: str, delta: torch.Tensor, probe: EvalSet, before: float) -> float:
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        _weight(model, name).add_(delta)
    return eval_loss(model, probe)[0] - before


def _calibrate(teacher: torch.nn.Module, name: str, delta: torch.Tensor, probe: EvalSet, before: float,
               damage: float, cap: float) -> float:
    lo, hi = 0.0, cap
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _damage(teacher, name, mid * delta, probe, before) < damage else (lo, mid)
    return (lo + hi) / 2


def _draw_modules(eligible: list[str], count: int, seed: int) -> list[str]:
    """`count` modules, spread over the categories (round robin) and over layers (at most 2 per layer)."""
    rng = random.Random(seed)
    pools = {cat: [n for n in eligible if category_of(n) is cat] for cat in Category}
    for pool in pools.values():
        rng.shuffle(pool)
    chosen: list[str] = []
    per_layer: dict[str, int] = {}
    while len(chosen) < count and any(pools.values()):
        for cat in Category:
            while pools[cat] and len(chosen) < count:
                name = pools[cat].pop()
                layer = name.split(".")[1]
                if per_layer.get(layer, 0) < 2:
                    chosen.append(name)
                    per_layer[layer] = per_layer.get(layer, 0) + 1
                    break
    return sorted(chosen)


def ensure_plant(base: BaseModel, teacher: torch.nn.Module, num_layers: int, variant, spec: PlantSpec, cache: Path,
                 log: Callable[[str], None] = lambda _: None) -> Plant:
    key = hashlib.sha256(json.dumps({"v": PLANT_VERSION, "base": base.spec.key(), **asdict(spec)},
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache) / f"plant-{key}"
    info_path = root / "plant.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return Plant(spec, root, info["ranks"], info["scales"], tuple(info["eligible"]))
    log(f"planting a change in {spec.modules} modules (plant seed {spec.seed})")
    probe = make_eval_set(draw_samples(base.law, 8, 60_000, "probe"), 4, variant, 11)
    before = eval_loss(teacher, probe)[0]
    g = torch.Generator().manual_seed(70_000 + spec.seed)
    names = targetable_modules(num_layers)
    # Sensitivity: a change of rank 32 and norm max_scale·||W|| must be able to do the damage, else the module is never planted.
    reach = {n: _damage(teacher, n, spec.max_scale * _direction(_weight(teacher, n), 32, g), probe, before)
             for n in names}
    eligible = [n for n in names if reach[n] >= spec.damage]
    if len(eligible) < spec.modules:  # a barely trained model (the --quick preset): the most sensitive ones
        eligible = sorted(names, key=lambda n: -reach[n])[: 2 * spec.modules]
    planted = _draw_modules(eligible, spec.modules, spec.seed)
    ranks, scales = {}, {}
    model = copy.deepcopy(teacher)
    for name in planted:
        rank = int(torch.randint(spec.rank_lo, spec.rank_hi + 1, (1,), generator=g))
        delta = _direction(_weight(teacher, name), rank, g)
        scale = _calibrate(teacher, name, delta, probe, before, spec.damage, spec.max_scale)
        with torch.no_grad():
            _weight(model, name).add_(scale * delta)
        ranks[name], scales[name] = rank, scale
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _write_original(partial / MODEL_FOLDER, base.spec.config(), model, base.spec.seed, base.law)
    (partial / "plant.json").write_text(json.dumps({"ranks": ranks, "scales": scales, "eligible": eligible,
                                                    "spec": asdict(spec)}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return Plant(spec, root, ranks, scales, tuple(eligible))
