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
            "--val-samples", "2", "--test-samples", "2", "--base-samples", "2", "--eval-draws", "2"]
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
    assert summary["max_param_mismatch_vs_flat"] <= 0.01
    assert all(math.isfinite(c["mean"]) for c in summary["comparisons"])
    assert len(summary["verdicts"]) == len(summary["comparisons"])
    assert json.loads((tmp_path / "result.json").read_text())["records"] == records
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
