"""The full-size benchmark's pipeline at toy sizes: checkpoint and data written, analyze twice, train, all timed."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from bench_support import load_bench


@pytest.mark.slow
def test_quick_run_times_every_phase_and_reads_the_probe_back(tmp_path):
    bench = load_bench("full_size")
    lines: list[str] = []
    result = bench.main(["--quick", "--workdir", str(tmp_path), "--out", str(tmp_path / "full.json")],
                        emit=lines.append)
    assert json.loads((tmp_path / "full.json").read_text(encoding="utf-8")) == result
    for phase in ("analyze_probe", "analyze_data", "train"):
        assert result[phase]["seconds"] > 0 and result[phase]["peak_gib"] > 0
    probe = result["probe_map"]
    assert probe["modules"] > 0 and probe["lr_used"] == probe["lr"] and probe["loss_probed"] < probe["loss_before"]
    assert 0 < result["probe_share_of_analysis"] < 1  # the probe costs something, and is not all of it
    assert (tmp_path / "run" / "final").is_dir()  # training ran on the map and saved its adapter
    with safe_open(str(tmp_path / "checkpoints" / "acestep-v15-base" / "model.safetensors"), "pt") as f:
        assert str(f.get_tensor(next(k for k in f.keys() if k.endswith("q_proj.weight"))).dtype) == "torch.bfloat16"
