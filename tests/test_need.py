"""The unbiased need estimate and the allocation it drives: water-filling and the concentration figure."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sidestep.analysis.allocate import RankBudget, concentration, water_fill_ranks
from sidestep.analysis.modules import ModuleShape, targetable_modules
from sidestep.analysis.signals import need_estimate


def _sketch_sums(grads: list[torch.Tensor], psi: torch.Tensor):
    """What the engine's hook accumulates for one module: Σ Z_i, Σ Z_iᵀZ_i, Σ ||Z_i||² with Z_i = G_iᵀ Ψ."""
    zs = [g.t() @ psi for g in grads]
    return sum(zs), sum(z.t() @ z for z in zs), float(sum(z.square().sum() for z in zs))


def test_need_removes_the_noise_that_biases_the_mean_gradient():
    g = torch.Generator().manual_seed(0)
    out, inp, n = 24, 16, 100
    mu = torch.zeros(out, inp)
    mu[:, :2] = torch.randn(out, 2, generator=g) * 0.3  # a rank-2 need
    grads = [mu + torch.randn(out, inp, generator=g) for _ in range(n)]  # noise: E||noise||² = 384 >> ||mu||²
    psi = torch.eye(out)  # an exact "sketch", so the estimate is checked without projection error
    z, gram, sq = _sketch_sums(grads, psi)
    need = need_estimate(z, gram, sq, n)
    truth = float(mu.square().sum())
    biased = float((z / n).square().sum())  # ||mean G||² = ||mu||² + tr Σ / n
    assert abs(need.total - truth) < 0.25 * truth
    assert biased - truth > 0.5 * truth  # the naive estimate is off by the noise term
    # The need lives in 2 directions: the first two eigenvalues hold it, the rest are noise around 0.
    assert need.within(2) > 0.7 * truth
    assert abs(sum(need.spectrum[2:])) < 0.3 * truth
    assert need.noise == pytest.approx(sq / n)


def test_need_of_pure_noise_is_near_zero_and_can_be_negative():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(8, 8, generator=g) for _ in range(200)]
    z, gram, sq = _sketch_sums(grads, torch.eye(8))
    need = need_estimate(z, gram, sq, 200)
    assert abs(need.total) < 0.05 * need.noise
    assert min(need.spectrum) < 0


def test_one_batch_has_no_need_estimate():
    z, gram, sq = _sketch_sums([torch.ones(4, 4)], torch.eye(4))
    assert need_estimate(z, gram, sq, 1).total == 0.0


def _shapes(names, width=32):
    return {n: ModuleShape(n, width, width) for n in names}


def test_water_filling_spends_the_flat_budget_where_the_need_per_parameter_is():
    names = targetable_modules(2)
    shapes = _shapes(names)
    hot = set(names[:3])
    spectra = {n: [(5.0 if n in hot else 0.01) / (j + 1) for j in range(40)] for n in names}
    budget = RankBudget(base=4, lo=2, hi=32, step=2, mode="flat")
    alloc = water_fill_ranks(spectra, shapes, budget)
    flat = sum(s.lora_params(4) for s in shapes.values())
    assert alloc.flat_equivalent_params == flat
    assert abs(alloc.trainable_params - flat) <= 2 * 64  # within one step of the largest module
    assert all(2 <= r <= 32 and r % 2 == 0 for r in alloc.ranks.values())
    assert min(alloc.ranks[n] for n in hot) > max((r for n, r in alloc.ranks.items() if n not in hot), default=0)
    assert list(alloc.ranks)[:3] == sorted(hot, key=names.index) or set(list(alloc.ranks)[:3]) == hot


def test_water_filling_leaves_out_modules_whose_need_is_noise():
    names = targetable_modules(2)
    shapes = _shapes(names)
    spectra = {n: [1.0] * 40 if i < 4 else [-0.1] * 40 for i, n in enumerate(names)}
    budget = RankBudget(base=4, lo=2, hi=32, step=2, mode="flat")
    alloc = water_fill_ranks(spectra, shapes, budget)
    assert set(alloc.ranks) <= set(names[:4])  # only modules with a need above the noise get an adapter
    flat = sum(s.lora_params(4) for s in shapes.values())
    assert abs(alloc.trainable_params - flat) <= 2 * 64


def test_water_filling_follows_the_shape_of_the_spectrum_not_only_its_sum():
    a, b = "layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"
    shapes = _shapes([a, b])
    # Same total need: a holds it in one direction, b spreads it over 16. A rank-4 budget per module
    # buys a's one direction at once and then b's, so b ends with the larger rank.
    spectra = {a: [16.0] + [0.0] * 31, b: [1.0] * 16 + [0.0] * 16}
    alloc = water_fill_ranks(spectra, shapes, RankBudget(base=4, lo=1, hi=32, step=1, mode="flat"))
    assert alloc.ranks[b] > alloc.ranks[a] >= 1


def test_water_filling_is_deterministic_and_order_free():
    names = targetable_modules(3)
    shapes = _shapes(names)
    rng = random.Random(3)
    spectra = {n: sorted((rng.random() for _ in range(24)), reverse=True) for n in names}
    budget = RankBudget(base=8, lo=4, hi=24, step=4, mode="flat")
    one = water_fill_ranks(spectra, shapes, budget)
    two = water_fill_ranks(dict(reversed(list(spectra.items()))), shapes, budget)
    assert one.ranks == two.ranks


def test_concentration_share_of_the_top_ten_percent():
    even = {f"m{i}": 1.0 for i in range(20)}
    assert concentration(even) == pytest.approx(0.10)
    peaked = {**even, "m0": 100.0}
    assert concentration(peaked) == pytest.approx(101.0 / 119.0)
    assert concentration({"a": -1.0, "b": 0.0}) == 0.0
    assert math.isclose(concentration({"a": 3.0}), 1.0)
