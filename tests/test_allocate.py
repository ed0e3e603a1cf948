"""Selection and rank allocation: plain numbers in, exact guarantees out."""

from __future__ import annotations

import random
import statistics

import pytest

from sidestep.analysis.allocate import (
    Allocation,
    BudgetMode,
    RankBudget,
    allocate_ranks,
    random_permutation_control,
    saturating_ranks,
    select_modules,
    size_signal,
)
from sidestep.analysis.modules import Category, ModuleShape, category_of, suffix_of, targetable_modules
from sidestep.errors import ConfigError

# ACE-Step 1.5 2B (hidden 2048, MLP 6144, 8 kv heads × 128): out × in per projection.
_ACE_2B = {
    "q_proj": (2048, 2048), "k_proj": (1024, 2048), "v_proj": (1024, 2048), "o_proj": (2048, 2048),
    "gate_proj": (6144, 2048), "up_proj": (6144, 2048), "down_proj": (2048, 6144),
}  # fmt: skip
_LARGEST_2B = 6144 + 2048


def ace_2b_shapes(num_layers: int = 24) -> dict[str, ModuleShape]:
    shapes = {}
    for name in targetable_modules(num_layers):
        out_f, in_f = _ACE_2B[suffix_of(name).split(".")[1]]
        shapes[name] = ModuleShape(name, in_features=in_f, out_features=out_f)
    return shapes


def square(names, width: int = 8) -> dict[str, ModuleShape]:
    return {name: ModuleShape(name, width, width) for name in names}


def assert_valid(alloc: Allocation, budget: RankBudget) -> None:
    step = budget.effective_step
    for name, rank in alloc.ranks.items():
        assert budget.lo <= rank <= budget.hi, (name, rank)
        assert rank % step == 0, (name, rank, step)


# ---- RankBudget -----------------------------------------------------------------------------------

BAD_BUDGETS = [
    ("rank zero", dict(base=0), "--rank "),
    ("rank bool", dict(base=True), "--rank "),
    ("rank float", dict(base=64.0), "--rank "),
    ("min zero", dict(lo=0), "--rank-min"),
    ("max negative", dict(hi=-1), "--rank-max"),
    ("min above max", dict(lo=64, hi=32, base=48), "--rank-min 64 is above --rank-max 32"),
    ("rank below min", dict(base=8), "--rank 8 is outside --rank-min 16..--rank-max 128; pick a rank in that range "
                                     "or pass --rank-min 8."),
    ("rank above max", dict(base=256), "--rank 256 is outside --rank-min 16..--rank-max 128; pick a rank in that "
                                       "range or pass --rank-max 256."),
    ("step not dividing", dict(step=24), "--rank-step"),
    ("budget mode", dict(mode="wide"), "--budget"),
    ("alpha ratio", dict(alpha_ratio=0), "--alpha-ratio"),
    ("inclusion zero", dict(inclusion=0.0), "--inclusion"),
    ("inclusion above 1", dict(inclusion=1.5), "--inclusion"),
    ("category floor", dict(category_floor=-0.1), "--category-floor"),
]


@pytest.mark.parametrize("label, kwargs, flag", BAD_BUDGETS, ids=[c[0] for c in BAD_BUDGETS])
def test_bad_budget_is_one_sentence_naming_the_flag(label, kwargs, flag):
    with pytest.raises(ConfigError) as info:
        RankBudget(**kwargs)
    message = str(info.value)
    assert flag in message
    assert message.endswith(".") and message.count(". ") == 0


def test_budget_defaults_match_the_cli():
    budget = RankBudget()
    assert (budget.base, budget.lo, budget.hi) == (64, 16, 128)
    assert budget.mode is BudgetMode.MEDIAN and budget.alpha_ratio == 2.0
    assert budget.effective_step == 8 and budget.rank_range == (16, 128)


def test_budget_mode_accepts_its_string_value():
    assert RankBudget(mode="flat").mode is BudgetMode.FLAT


@pytest.mark.parametrize(
    "lo, base, hi, step, expected",
    [
        (16, 64, 128, None, 8),
        (8, 64, 128, None, 8),
        (5, 64, 128, None, 4),  # largest power of two <= min
        (4, 64, 128, None, 4),
        (2, 64, 128, None, 2),
        (1, 64, 128, None, 1),
        (16, 20, 128, None, 4),  # gcd(8, 20): --rank stays attainable
        (4, 6, 16, None, 2),
        (3, 7, 16, None, 1),
        (16, 64, 128, 16, 16),  # an explicit --rank-step wins
    ],
)
def test_effective_step(lo, base, hi, step, expected):
    budget = RankBudget(base=base, lo=lo, hi=hi, step=step)
    assert budget.effective_step == expected
    assert budget.base % expected == 0


def test_rank_range_is_the_step_grid_inside_min_max():
    assert RankBudget(base=24, lo=12, hi=60).rank_range == (16, 56)  # step 8
    assert RankBudget(base=20, lo=17, hi=30).rank_range == (20, 28)  # step gcd(8, 20) = 4


# ---- select_modules -------------------------------------------------------------------------------


def test_selection_keeps_ceil_of_the_fraction():
    names = targetable_modules(24)
    scores = {name: float(i % 97) + i / 1000 for i, name in enumerate(names)}  # categories interleaved
    chosen = select_modules(scores, 0.55, 0.10)
    assert len(chosen) == 146  # ceil(0.55 · 264 = 145.2)
    assert chosen == sorted(scores, key=lambda n: -scores[n])[:146]
    twenty = {f"layers.{i // 11}.{suffix_of(n)}": 1.0 + i for i, n in enumerate(targetable_modules(2)[:20])}
    assert len(select_modules(twenty, 0.55, 0.0)) == 11  # 0.55 · 20 is 11.000000000000002 in floats


def test_selection_is_best_first_with_ties_broken_by_name():
    scores = dict.fromkeys(targetable_modules(2), 1.0)
    chosen = select_modules(scores, 0.5, 0.0)
    assert chosen == sorted(scores)[:11]


def test_category_with_all_low_scores_is_lifted_to_ten_percent():
    names = targetable_modules(24)
    scores = {n: (1e-6 * (i + 1) if category_of(n) is Category.CROSS_ATTN else 1.0 + i) for i, n in enumerate(names)}
    chosen = select_modules(scores, 0.55, 0.10)
    cross = [n for n in chosen if category_of(n) is Category.CROSS_ATTN]
    assert len(cross) == 10  # ceil(0.10 · 96)
    best_cross = sorted((n for n in names if category_of(n) is Category.CROSS_ATTN), key=lambda n: -scores[n])
    assert set(cross) == set(best_cross[:10])
    assert len(chosen) == 146 + 10


def test_small_category_floor_still_keeps_one():
    names = targetable_modules(2)
    scores = {n: (0.0 if category_of(n) is Category.MLP else 1.0 + i) for i, n in enumerate(names)}
    chosen = select_modules(scores, 0.3, 0.01)
    assert sum(category_of(n) is Category.MLP for n in chosen) == 1
    assert not any(category_of(n) is Category.MLP for n in select_modules(scores, 0.3, 0.0))


def test_selection_rejects_bad_scores():
    with pytest.raises(ValueError, match="layers.0.mlp.up_proj"):
        select_modules({"layers.0.mlp.up_proj": float("nan")})


# ---- size_signal ----------------------------------------------------------------------------------


def test_fisher_signal_is_relative_to_its_median():
    assert size_signal({"a": 1.0, "b": 2.0, "c": 4.0}) == {"a": 0.5, "b": 1.0, "c": 2.0}


def test_combined_signal_is_the_geometric_mean_of_both_ratios():
    s = size_signal({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 40.0, "b": 20.0, "c": 10.0})
    assert s == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    s = size_signal({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 10.0, "b": 20.0, "c": 40.0})
    assert s == pytest.approx({"a": 0.5, "b": 1.0, "c": 2.0})


def test_signal_edge_cases():
    assert size_signal({"a": 0.0, "b": 0.0}) == {"a": 1.0, "b": 1.0}  # no information: equal
    assert size_signal({"a": 0.0, "b": 0.0, "c": 3.0}) == {"a": 0.0, "b": 0.0, "c": 1.0}  # median 0: mean of the rest
    with pytest.raises(ValueError):
        size_signal({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError):
        size_signal({"a": -1.0})


# ---- median mode ----------------------------------------------------------------------------------


def test_median_module_gets_base_rank():
    alloc = allocate_ranks({"a": 1.0, "b": 2.0, "c": 8.0}, square("abc"), RankBudget(base=16, lo=4, hi=64))
    assert alloc.ranks == {"a": 8, "b": 16, "c": 64}
    assert alloc.alphas == {"a": 16, "b": 32, "c": 128}
    assert alloc.dropped == ()


def test_even_count_pins_both_middle_modules_to_base():
    # Rounding and clamping alone give 16, 16, 128, 128 (median 72); the middle pair is pinned to 64.
    alloc = allocate_ranks({"a": 1.0, "b": 1.0, "c": 50.0, "d": 50.0}, square("abcd"), RankBudget())
    assert alloc.ranks == {"a": 16, "b": 64, "c": 64, "d": 128}
    assert statistics.median(alloc.ranks.values()) == 64


def test_flat_signal_gives_base_everywhere():
    alloc = allocate_ranks(dict.fromkeys("abcdef", 3.0), square("abcdef"), RankBudget(base=32))
    assert set(alloc.ranks.values()) == {32}


def test_single_module_and_empty_signal():
    assert allocate_ranks({"a": 5.0}, square("a"), RankBudget()).ranks == {"a": 64}
    empty = allocate_ranks({}, {}, RankBudget())
    assert empty.ranks == {} and empty.trainable_params == 0


def test_small_min_gives_a_finer_step():
    budget = RankBudget(base=8, lo=4, hi=32)
    alloc = allocate_ranks({"a": 0.5, "b": 1.0, "c": 1.5}, square("abc"), budget)
    assert budget.effective_step == 4
    assert alloc.ranks == {"a": 4, "b": 8, "c": 12}


def test_rounding_is_half_up():
    # 64 · 0.8125 = 52 = 6.5 steps of 8: half-up gives 56 (banker's rounding would give 48).
    alloc = allocate_ranks({"a": 0.8125, "b": 1.0, "c": 3.0}, square("abc"), RankBudget())
    assert alloc.ranks["a"] == 56


def test_alpha_follows_the_ratio_rounded_half_up():
    alloc = allocate_ranks({"a": 1.0, "b": 2.0, "c": 3.0}, square("abc"), RankBudget(base=3, lo=1, hi=8, alpha_ratio=1.5))
    assert alloc.ranks == {"a": 2, "b": 3, "c": 5}  # 3 · 1.5 = 4.5 -> 5
    assert alloc.alphas == {"a": 3, "b": 5, "c": 8}  # 4.5 -> 5, 7.5 -> 8


def test_param_counts():
    shapes = {"a": ModuleShape("a", 10, 20), "b": ModuleShape("b", 30, 40)}
    all_shapes = {**shapes, "c": ModuleShape("c", 5, 5)}
    alloc = allocate_ranks({"a": 1.0, "b": 4.0}, shapes, RankBudget(base=16, lo=8, hi=64), all_shapes)
    assert alloc.ranks == {"a": 16, "b": 16}  # even count: both middle modules
    assert alloc.trainable_params == 16 * 30 + 16 * 70
    assert alloc.flat_equivalent_params == 16 * (30 + 70 + 10)


def _random_budget(rng: random.Random, mode: BudgetMode) -> RankBudget:
    lo = rng.choice([1, 2, 3, 4, 5, 8, 12, 16, 32])
    hi = lo * rng.choice([1, 2, 4, 8, 16])
    base = rng.randint(lo, hi)
    return RankBudget(base=base, lo=lo, hi=hi, mode=mode)


def _random_signal(rng: random.Random, n: int) -> dict[str, float]:
    kind = rng.choice(["lognormal", "skewed", "flat", "ties"])
    if kind == "lognormal":
        return {f"m{i:03d}": rng.lognormvariate(0, rng.uniform(0.1, 3)) for i in range(n)}
    if kind == "skewed":
        return {f"m{i:03d}": rng.paretovariate(0.7) for i in range(n)}
    if kind == "flat":
        return {f"m{i:03d}": 1.0 for i in range(n)}
    return {f"m{i:03d}": float(rng.randint(0, 3)) for i in range(n)}


def test_median_is_base_exactly_for_many_random_signals():
    rng = random.Random(1234)
    for trial in range(400):
        signal = _random_signal(rng, rng.randint(1, 80))
        budget = _random_budget(rng, BudgetMode.MEDIAN)
        alloc = allocate_ranks(signal, square(signal), budget)
        assert statistics.median(alloc.ranks.values()) == budget.base, (trial, budget)
        assert_valid(alloc, budget)
        # a stronger signal never gets a smaller rank
        by_signal = sorted(signal, key=lambda n: (signal[n], n))
        ranks = [alloc.ranks[n] for n in by_signal]
        assert ranks == sorted(ranks), trial


def test_allocation_is_deterministic_and_order_free():
    rng = random.Random(7)
    signal = {n: rng.lognormvariate(0, 1) for n in targetable_modules(24)}
    shapes = ace_2b_shapes()
    for mode in BudgetMode:
        budget = RankBudget(mode=mode)
        first = allocate_ranks(signal, shapes, budget)
        again = allocate_ranks(dict(reversed(list(signal.items()))), shapes, budget)
        assert first == allocate_ranks(signal, shapes, budget)
        assert first.ranks == again.ranks and set(first.dropped) == set(again.dropped)


# ---- flat mode ------------------------------------------------------------------------------------


def test_flat_budget_on_ace_step_2b_shapes():
    shapes = ace_2b_shapes()
    for seed in range(25):
        rng = random.Random(seed)
        scores = {n: rng.lognormvariate(0, 1.5) for n in shapes}
        chosen = select_modules(scores, 0.55, 0.10)
        signal = size_signal({n: scores[n] for n in chosen}, {n: rng.uniform(4, 128) for n in chosen})
        budget = RankBudget(mode=BudgetMode.FLAT)
        alloc = allocate_ranks(signal, {n: shapes[n] for n in chosen}, budget, shapes)
        assert alloc.flat_equivalent_params == 64 * 24 * (4 * 4096 + 4 * 3072 + 3 * 8192)
        assert abs(alloc.trainable_params - alloc.flat_equivalent_params) <= 8 * _LARGEST_2B, seed
        assert_valid(alloc, budget)
        assert set(alloc.ranks) | set(alloc.dropped) == set(chosen)
        assert not set(alloc.ranks) & set(alloc.dropped)


def test_flat_budget_on_random_tiny_shapes():
    rng = random.Random(99)
    for trial in range(300):
        signal = _random_signal(rng, rng.randint(1, 40))
        shapes = {n: ModuleShape(n, rng.randint(1, 64), rng.randint(1, 64)) for n in signal}
        budget = _random_budget(rng, BudgetMode.FLAT)
        alloc = allocate_ranks(signal, shapes, budget)
        tolerance = budget.effective_step * max(s.in_features + s.out_features for s in shapes.values())
        assert abs(alloc.trainable_params - alloc.flat_equivalent_params) <= tolerance, (trial, budget)
        assert_valid(alloc, budget)


def test_flat_mode_drops_modules_below_min_instead_of_inflating():
    signal = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "tiny": 0.01}
    alloc = allocate_ranks(signal, square(signal, 100), RankBudget(mode="flat"))
    assert alloc.dropped == ("tiny",)
    assert "tiny" not in alloc.ranks and "tiny" not in alloc.alphas
    assert alloc.ranks == dict.fromkeys("abcd", 80)  # 4 · 80 = 5 · 64: the dropped share is spent on the rest
    assert alloc.trainable_params == alloc.flat_equivalent_params


def test_flat_mode_saturates_at_max_when_the_budget_cannot_be_spent():
    selected = square(["a", "b"], 8)
    all_shapes = {**selected, **square(["c", "d", "e", "f", "g"], 8)}
    alloc = allocate_ranks({"a": 1.0, "b": 2.0}, selected, RankBudget(mode="flat"), all_shapes)
    assert alloc.ranks == {"a": 128, "b": 128}
    assert alloc.trainable_params < alloc.flat_equivalent_params


# ---- saturating ranks (probe maps, flat budget) ------------------------------------------------------


def test_saturating_ranks_grow_with_the_log_of_the_share():
    shares = {"big": 10.0, "b": 1.0, "c": 1.0, "d": 1.0}
    budget = RankBudget(base=16, lo=1, hi=64, step=1, mode="flat")
    alloc = saturating_ranks(shares, square(shares, 32), budget, scale=8.0)
    # ten times the share buys scale · ln 10 ≈ 18 more rank; in proportion to the share it would be 40 against 8
    equal = [alloc.ranks[n] for n in "bcd"]
    assert max(equal) - min(equal) <= 1  # equal shares: equal ranks, up to the last step of the budget
    assert alloc.ranks["big"] - min(equal) in (18, 19)
    assert abs(alloc.trainable_params - alloc.flat_equivalent_params) <= 64
    # a longer scale tends to the proportional ranks: the larger share takes more of the budget
    assert saturating_ranks(shares, square(shares, 32), budget, scale=64.0).ranks["big"] > alloc.ranks["big"]


def test_saturating_ranks_spend_the_flat_budget_on_ace_step_2b_shapes():
    shapes = ace_2b_shapes()
    budget = RankBudget(mode=BudgetMode.FLAT)
    for seed in range(5):
        rng = random.Random(seed)
        shares = {n: rng.lognormvariate(0, 1.5) for n in shapes}
        nothing = rng.sample(sorted(shapes), 3)
        for name, value in zip(nothing, (0.0, -1.0, float("nan"))):
            shares[name] = value
        alloc = saturating_ranks(shares, shapes, budget, scale=2.0 * budget.base)
        assert abs(alloc.trainable_params - alloc.flat_equivalent_params) <= 8 * _LARGEST_2B, seed
        assert_valid(alloc, budget)
        assert not set(nothing) & set(alloc.ranks)  # a fix that removed nothing never gets an adapter
        per_param = {n: shares[n] / (shapes[n].in_features + shapes[n].out_features) for n in alloc.ranks}
        order = sorted(alloc.ranks, key=lambda n: -per_param[n])
        ranks = [alloc.ranks[n] for n in order]
        assert ranks == sorted(ranks, reverse=True)  # more share per parameter, never less rank


def test_saturating_ranks_fill_a_budget_too_big_for_the_useful_modules_by_share_not_by_name():
    # the one positive share is capped at --rank-max, and the flat budget must still land somewhere:
    # the least harmful share goes first (−0.2 before −1, NaN last), whatever the names' order
    shares = {"a": 1.0, "m": -0.2, "z": -1.0, "n": float("nan")}
    budget = RankBudget(base=8, lo=1, hi=16, step=1, mode="flat")
    alloc = saturating_ranks(shares, square(shares, 32), budget, scale=16.0)
    assert alloc.ranks == {"a": 16, "m": 16}
    assert alloc.trainable_params == alloc.flat_equivalent_params


def test_saturating_ranks_reject_a_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        saturating_ranks({"a": 1.0}, square(["a"]), RankBudget(mode="flat"), scale=0.0)


# ---- permutation control --------------------------------------------------------------------------


def test_permutation_control_keeps_the_histogram_and_modules():
    rng = random.Random(3)
    signal = {n: rng.lognormvariate(0, 1) for n in targetable_modules(4)}
    alloc = allocate_ranks(signal, square(signal), RankBudget())
    control = random_permutation_control(alloc, seed=5)
    assert set(control) == set(alloc.ranks)
    assert sorted(control.values()) == sorted(alloc.ranks.values())
    assert control == random_permutation_control(alloc, seed=5)
    assert any(random_permutation_control(alloc, seed=s) != alloc.ranks for s in range(3))
