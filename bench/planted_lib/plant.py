"""A base model with a known, concentrated, high-rank change: where a good map must put the adapter.

Construction ("reverse plant"): the teacher T is the quality benchmark's pretrained tiny DiT, and the dataset is
drawn from the very law T was pretrained on, so the teacher is consistent with its data by construction. The
base B that the user fine-tunes is T with a rank-r_s change added to each of |S| planted modules s:
    W_s(B) = W_s(T) + c_s · D_s,   D_s = Σ_i a_i u_i v_π(i)ᵀ   (r_s in [rank_lo, rank_hi], ||D_s|| = ||W_s(T)||)
where u_i are the top output directions of the module's loss curvature (eigenvectors of E[δδᵀ], δ = ∂loss/∂y),
v_j the top input directions (eigenvectors of E[xxᵀ]), π a random pairing and a_i = 1/√(g_i σ_π(i)), so that every
one of the r_s components costs the same loss (in the Kronecker-factored approximation). A change of random
directions instead (version 2) sits mostly where the module's inputs never go: a rank-4 adapter then repairs most
of its effect and no allocation can beat a flat LoRA, so the benchmark could not tell good maps from bad. Here a
rank-k adapter in s can repair at most about k/r_s of the damage s does, which is what makes allocation matter.
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
from sidestep.objective import flow_matching_loss, noise_like, sampler_for_focus

from quality_lib.base_model import MODEL_FOLDER, BaseModel, _write_original
from quality_lib.evaluate import EvalSet, eval_loss, make_eval_set
from quality_lib.synthetic import draw_samples, random_batch

PLANT_VERSION = 3


@dataclass(frozen=True)
class PlantSpec:
    seed: int
    modules: int = 6  # |S|, two per category when possible
    damage: float = 0.004  # loss increase each planted module causes alone
    max_scale: float = 2.0  # a planted change is at most this multiple of the weight's norm
    rank_lo: int = 12
    rank_hi: int = 32


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


@dataclass(frozen=True)
class Curvature:
    """A module's Kronecker factors on the law: input second moment A = E[xxᵀ], output-gradient moment B = E[δδᵀ]."""

    a_vals: torch.Tensor
    a_vecs: torch.Tensor  # columns, largest eigenvalue first
    b_vals: torch.Tensor
    b_vecs: torch.Tensor


def measure_curvature(model: torch.nn.Module, names: list[str], law, variant, batches: int, seed: int) -> dict[str, Curvature]:
    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    mods = {n: dict(model.named_modules())[original_to_diffusers(n)] for n in names}
    a = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    b = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in mods.items()}
    tokens = dict.fromkeys(names, 0)
    hooks = []
    for n, m in mods.items():
        m.weight.requires_grad_(True)

        def backward(grad: torch.Tensor, n: str) -> None:
            d = grad.detach().reshape(-1, grad.shape[-1]).double()
            b[n] += d.T @ d

        def forward(_m, inp, out, n=n):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            a[n] += x.T @ x
            tokens[n] += x.shape[0]
            out.register_hook(lambda grad, n=n: backward(grad, n))  # ∂loss/∂output of this module
        hooks.append(m.register_forward_hook(forward))
    g = torch.Generator().manual_seed(seed)
    sampler = sampler_for_focus("balanced", variant)
    try:
        for _ in range(batches):
            batch = random_batch(law, 4, g)
            flow_matching_loss(model, batch, sampler.sample(4, g), noise_like(batch.target_latents, g)).backward()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        av, avec = torch.linalg.eigh(a[n] / max(tokens[n], 1))
        bv, bvec = torch.linalg.eigh(b[n] / batches)
        out[n] = Curvature(av.flip(0).clamp_min(0), avec.flip(1), bv.flip(0).clamp_min(0), bvec.flip(1))
    return out


def _direction(weight: torch.Tensor, curv: Curvature, rank: int, g: torch.Generator) -> torch.Tensor:
    """`rank` equal-cost components on the module's top curvature directions, scaled to the weight's norm."""
    rank = min(rank, len(curv.a_vals), len(curv.b_vals))
    pairing = torch.randperm(rank, generator=g)
    sign = torch.randint(0, 2, (rank,), generator=g).double() * 2 - 1
    g_vals = curv.b_vals[:rank].clamp_min(curv.b_vals[0] * 1e-4)
    s_vals = curv.a_vals[pairing].clamp_min(curv.a_vals[0] * 1e-4)
    amp = sign / (g_vals * s_vals).sqrt()
    delta = (curv.b_vecs[:, :rank] * amp) @ curv.a_vecs[:, pairing].T
    return (delta * (weight.norm().double() / delta.norm())).to(weight.dtype)


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
    curvature = measure_curvature(teacher, names, base.law, variant, 16, 80_000)
    # Sensitivity: a change of the top rank and norm max_scale·||W|| must be able to do the damage, else the module
    # is never planted.
    reach = {n: _damage(teacher, n, spec.max_scale * _direction(_weight(teacher, n), curvature[n], spec.rank_hi, g),
                        probe, before) for n in names}
    eligible = [n for n in names if reach[n] >= spec.damage]
    if len(eligible) < spec.modules:  # a barely trained model (the --quick preset): the most sensitive ones
        eligible = sorted(names, key=lambda n: -reach[n])[: 2 * spec.modules]
    planted = _draw_modules(eligible, spec.modules, spec.seed)
    ranks, scales = {}, {}
    model = copy.deepcopy(teacher)
    for name in planted:
        rank = int(torch.randint(spec.rank_lo, spec.rank_hi + 1, (1,), generator=g))
        delta = _direction(_weight(teacher, name), curvature[name], rank, g)
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
