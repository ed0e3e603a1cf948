"""The quality benchmark's pipeline end to end at toy sizes: every arm runs through the real analyze and train."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench_support import load_bench


@pytest.mark.slow
def test_quick_run_has_every_arm_matched_budgets_and_finite_metrics(tmp_path):
    bench = load_bench("quality")
    from quality_lib.arms import ARM_ORDER  # importable once the bench put its folder on sys.path

    lines: list[str] = []
    argv = ["--quick", "--cache", str(tmp_path / "cache"), "--workdir", str(tmp_path / "work"),
            "--out", str(tmp_path / "result.json"), "--markdown", str(tmp_path / "table.md"),
            "--layers", "2", "--hidden", "32", "--pretrain-steps", "20", "--steps", "3", "--train-samples", "6",
            "--val-samples", "2", "--test-samples", "2", "--base-samples", "2", "--eval-draws", "2", "--rank-max", "8"]
    threads = torch.get_num_threads()
    try:
        summary = bench.main(argv, emit=lines.append)  # sets torch to 1 thread, as the bench does
    finally:
        torch.set_num_threads(threads)

    records = [json.loads(line) for line in lines[:-1]]
    assert json.loads(lines[-1])["summary"] is True
    assert summary["skipped"] == {}  # the gradient-init arms run too, now that --init gradient exists
    assert [r["arm"] for r in records] == list(ARM_ORDER)  # every arm, in the table's order

    flat = next(r for r in records if r["arm"] == "flat")
    for rec in records:
        assert abs(rec["params"] / flat["params"] - 1) <= 0.01, (rec["arm"], rec["params"], flat["params"])
        for key in ("test_loss", "val_loss", "forgetting", "adaptation", "base_loss_after", "train_seconds"):
            assert math.isfinite(rec[key]), (rec["arm"], key)
    # (4h) is map (4) at flat LoRA's chosen rate, halved as `sidestep train` halves its default with a map
    product, mapped = (next(r for r in records if r["arm"] == key) for key in ("map_flat_product_lr", "map_flat"))
    assert [s["lr"] for s in product["lr_sweep"]] == [flat["best_lr"] * 0.5]
    assert product["modules"] == mapped["modules"] and product["params"] == mapped["params"]
    assert summary["max_param_mismatch_vs_flat"] <= 0.01
    assert all(math.isfinite(c["mean"]) for c in summary["comparisons"])
    assert len(summary["verdicts"]) == len(summary["comparisons"])
    full = json.loads((tmp_path / "result.json").read_text())
    assert full["records"] == records
    # median mode keeps --rank-max 8 (2 × --rank); the --budget flat map gets the product's 4 × --rank
    assert [cell["flat_map_rank_max"] for cell in full["cells"]] == [16]
    assert "| arm |" in (tmp_path / "table.md").read_text()


def test_t_quantiles_come_from_scipy():
    load_bench("quality")
    from quality_lib.stats import t975

    # The old hand table answered 2.060 (its df-25 entry) for df 21-24.
    assert [round(t975(df), 3) for df in (1, 9, 21, 24, 30)] == [12.706, 2.262, 2.080, 2.064, 2.042]


def test_ratio_of_means_resamples_the_cells_together():
    load_bench("quality")
    from quality_lib.stats import ratio_of_means

    exact = ratio_of_means([0.5, 1.0, 1.5], [1.0, 2.0, 3.0])
    assert exact["ratio"] == pytest.approx(0.5)
    # Cell by cell the numerator is half the denominator, so every resample gives 0.5: only a paired
    # resampling (the same cells on both sides) yields a zero-width interval here.
    assert exact["ci95_boot"] == pytest.approx([0.5, 0.5])
    noisy = ratio_of_means([0.9, 0.1, 0.7, 0.2, 0.6, 0.4, 0.8, 0.3], [1.0] * 8)
    lo, hi = noisy["ci95_boot"]
    assert noisy["ratio"] == pytest.approx(0.5) and lo < 0.5 < hi
    assert 0.2 < hi - lo < 0.5
    assert ratio_of_means([0.3], [0.6]) == {"ratio": pytest.approx(0.5), "n": 1, "ci95_boot": None}
    with pytest.raises(ValueError):
        ratio_of_means([0.1, 0.2], [0.3])


def test_scattered_control_keeps_the_ranks_and_draws_the_modules():
    load_bench("quality")
    from quality_lib.allocation import scattered

    names = [f"m{i:02d}" for i in range(40)]
    ranks = {"m00": 24, "m01": 8, "m02": 8, "m03": 4}
    draws = [scattered(ranks, names, seed) for seed in range(5)]
    for out in draws:
        assert sorted(out.values()) == sorted(ranks.values()) and set(out) <= set(names)
    assert draws[0] == scattered(ranks, names, 0)  # seeded
    assert any(set(out) != set(ranks) for out in draws)  # the modules are drawn, not kept


def test_budget_matching_does_not_trade_one_gap_back_and_forth():
    load_bench("quality")
    from quality_lib.allocation import match_budget, params_of

    from sidestep.analysis.modules import ModuleShape

    # Steps of 96, 128 and 192 parameters: at a gap of 64 a 128 step only flips its sign (the old rule moved one
    # module up and another down until it gave up 1.1% off); the 96 step, or a swap of two, gets within 1%.
    size = {"v0": 48, "v1": 48, "v2": 48, "v3": 48, "o0": 64, "o1": 64, "o2": 64, "o3": 64, "m0": 96, "m1": 96,
            "m2": 96, "m3": 96, "m4": 96}
    ranks = {"v0": 14, "v1": 2, "v2": 6, "v3": 4, "o0": 4, "o1": 4, "o2": 4, "o3": 12, "m0": 4, "m1": 8, "m2": 8,
             "m3": 8, "m4": 6}
    shapes = {n: ModuleShape(n, s // 2, s - s // 2) for n, s in size.items()}
    out = match_budget(ranks, shapes, 5888, 2, 2, 16, tolerance=0.01)
    assert abs(params_of(out, shapes) / 5888 - 1) <= 0.01
    only_big = {n: 4 for n in ("o0", "o1", "m0")}  # steps of 128 and 192 only: a swap closes a gap of 64
    shapes_big = {n: shapes[n] for n in only_big}
    out = match_budget(only_big, shapes_big, params_of(only_big, shapes_big) + 64, 2, 2, 16, tolerance=0.01)
    assert params_of(out, shapes_big) == params_of(only_big, shapes_big) + 64


def test_flat_budget_maps_get_the_products_flat_cap_unless_given():
    load_bench("quality")
    from quality_lib.arms import Budget

    from sidestep.analysis.config import FLAT_HEADROOM, default_rank_max

    preset = Budget(4, 1, 8, 1)  # the quality preset: --rank-max 8 = 2 × --rank, the median mode's ratio
    assert preset.flat_cap == FLAT_HEADROOM * 4 == 16
    assert preset.for_flat_maps().hi == 16 and preset.for_flat_maps().base == 4
    assert default_rank_max("flat", 64) == 64 * FLAT_HEADROOM  # the product's ratio the bench scales down
    wide = Budget(4, 1, 64, 1)  # the planted preset: room for the oracle; the maps still stop at 16
    assert wide.flat_cap == 16 and wide.for_flat_maps().hi == 64
    assert Budget(4, 1, 8, 1, flat_hi=8).flat_cap == 8  # --flat-rank-max 8: the old capped measurement
