"""The data-parallel benchmark at toy sizes: both jobs run on one and two gloo processes and report."""

from __future__ import annotations

import pytest

from bench_support import load_bench


@pytest.mark.slow
@pytest.mark.parametrize("job", ["train", "probe"])
def test_one_and_two_processes_run_and_report_a_speedup(job):
    bench = load_bench("scale")
    result = bench.main(["--job", job, "--processes", "1", "2", "--steps", "2", "--layers", "2", "--hidden", "32",
                         "--frames", "32", "--samples", "4"])
    assert result["job"] == job
    runs = result["results"]
    assert [r["processes"] for r in runs] == [1, 2] and runs[0]["speedup"] == 1.0 and runs[1]["speedup"] > 0
    if job == "probe":  # the split probe reaches the one-process result
        assert runs[0]["loss_fall"] > 0 and runs[1]["loss_fall"] == pytest.approx(runs[0]["loss_fall"], rel=1e-3)
    else:
        assert runs[1]["allreduce_ms"] > 0  # two processes do all-reduce the gradients
