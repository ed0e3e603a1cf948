"""The planted benchmark end to end at toy sizes, and the differential control of the probe and the need.

The control: the analysis on samples the planted base draws itself must find a less concentrated measure than
on the planted task, the same data analysed with two seeds must agree, and two different plants must give
different maps. For the need only the seed agreement holds: it is still dominated by the model's own
sensitivity (bench/README.md "Planted": two plants agree at Spearman 0.80–0.93 in the full benchmark). For the
probe, the default signal, it is the other way round: two plants mostly differ in the full benchmark (all but
one pair), but two seeds do not agree. Strict xfails mark what fails deterministically, so the day one passes its marker must go;
non-strict ones record targets that sit within noise.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench_support import load_bench

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    lines: list[str] = []
    argv = ["--quick", "--plants", "0,1", "--seeds", "2", "--signals", "data,need", "--train-samples", "16", "--cache", str(tmp / "cache" / "q"),
            "--workdir", str(tmp / "work"), "--out", str(tmp / "result.json"), "--markdown", str(tmp / "table.md")]
    threads = torch.get_num_threads()
    try:
        summary = load_bench("planted").main(argv, emit=lines.append)
    finally:
        torch.set_num_threads(threads)
    return summary, [json.loads(line) for line in lines[:-1]], json.loads((tmp / "result.json").read_text()), tmp


def test_every_arm_is_trained_at_the_flat_budget_and_the_oracle_adapts_only_the_plant(quick_run):
    summary, records, full, tmp = quick_run
    arms = ["flat", "oracle", "oracle_sibling", "oracle_control", "planted_equal", "map_data", "map_need",
            "map_median", "reference", "control", "control_anywhere"]
    assert [r["arm"] for r in records] == arms * 4  # 2 plants × 2 seeds
    flat = {(r["plant"], r["seed"]): r["params"] for r in records if r["arm"] == "flat"}
    for rec in records:
        assert abs(rec["params"] / flat[(rec["plant"], rec["seed"])] - 1) <= 0.01, rec["arm"]
        for key in ("distill", "test_loss", "forgetting"):
            assert math.isfinite(rec[key]), (rec["arm"], key)
    for cell in full["cells"]:
        assert cell["arms"]["oracle"]["planted_param_share"] == 1.0
        sibling = cell["arms"]["oracle_sibling"]  # the same ranks, planted MLP gate/up moved to the partner
        assert sibling["modules"] == cell["arms"]["oracle"]["modules"]
        assert abs(sibling["params"] / cell["arms"]["oracle"]["params"] - 1) <= 0.01
        assert sibling["planted_or_partner_param_share"] == 1.0
        assert cell["arms"]["planted_equal"]["planted_recall"] == 1.0
        # the oracle's own permutation keeps the planted modules and only moves their ranks
        assert cell["arms"]["oracle_control"]["planted_param_share"] == 1.0
        assert cell["arms"]["oracle_control"]["modules"] == cell["arms"]["oracle"]["modules"]
        # the two controls: the map's ranks shuffled over its own modules, and the same ranks on random modules
        assert cell["arms"]["control_anywhere"]["modules"] == cell["arms"]["control"]["modules"]
        assert cell["arms"]["flat"]["planted_recall"] == 1.0
        assert set(cell["precision_top_S"]) == {"data", "need"}
        for signal, value in cell["precision_top_S"].items():  # a partner, or any projection of the MLP, only adds hits
            assert value <= cell["precision_top_S_with_partner"][signal] <= cell["precision_top_S_same_mlp"][signal] <= 1
    assert summary["arms"]["oracle"]["distill"]["mean"] < 1.0  # the oracle moves towards the teacher
    assert {"distill_vs_control", "distill_vs_control_anywhere"} <= set(summary["arms"]["map_data"])
    assert "distill_vs_control" in summary["arms"]["oracle"]  # the oracle against its own permutation
    assert "distill_vs_control" not in summary["arms"]["oracle_control"]
    assert isinstance(summary["acceptance"]["oracle_beats_its_own_permutation"], bool)
    for criterion in ("own_samples_less_concentrated_than_every_plant", "two_seeds_agree_at_least_0.95",
                      "two_plants_maps_differ_at_most_0.5", "teacher_loss_fall_below_every_plant"):
        assert isinstance(summary["acceptance"][criterion], bool), criterion  # the differential, read in this run
    assert "Issue 18's criteria" in (tmp / "table.md").read_text()
    for arm in ("map_data", "control"):  # the share of the oracle's gain comes with its interval
        row = summary["arms"][arm]
        lo, hi = row["oracle_gain_share_ci95"]
        assert lo <= row["oracle_gain_share"] <= hi
    for measure in ("probe", "need"):  # the default map's measure, and the need the analysis writes beside it
        control = summary["differential_control"][measure]
        assert len(control["own_samples_top10_share"]) == 2 and len(control["planted_top10_share"]) == 4
        assert len(control["teacher_top10_share"]) == 2  # the teacher analysed on each plant's training data
    falls = summary["differential_control"]["probe"]["relative_fall"]
    assert [len(falls[k]) for k in ("planted", "own_samples", "teacher")] == [4, 2, 2]
    assert all(-1 < v < 1 for values in falls.values() for v in values)
    assert "| arm |" in (tmp / "table.md").read_text()
    # the maps stop at the product's flat cap, 4 × --rank 4, not at the oracle's --rank-max 32
    assert [cell["map_rank_max"] for cell in full["cells"]] == [16] * 4
    agree = summary["map_agreement"]  # the default maps themselves: 2 plants × 2 seeds
    assert len(agree["budget_shared_two_seeds"]) == 2 and len(agree["budget_shared_two_plants"]) == 1
    assert all(0 <= v <= 1 for v in agree["budget_shared_two_seeds"] + agree["budget_shared_two_plants"])


def test_acceptance_reads_each_criterion_from_its_interval():
    bench = load_bench("planted")
    stat = lambda lo, hi: {"mean": (lo + hi) / 2, "ci95_t": [lo, hi]}  # noqa: E731
    arms = {"oracle": {"distill_vs_flat": stat(-0.08, -0.05), "distill_vs_control": stat(-0.01, 0.001)},
            f"map_{bench.DEFAULT_SIGNAL}": {"distill_vs_flat": stat(-0.07, -0.04), "oracle_gain_share": 0.69,
                                            "distill_vs_control": stat(-0.02, -0.001),
                                            "forgetting_vs_flat": stat(0.0001, 0.002)}}
    checks = bench.acceptance(arms, {bench.DEFAULT_SIGNAL: 0.8}, {})
    assert checks["oracle_beats_flat"] and checks["map_beats_flat"]
    assert checks["oracle_beats_its_own_permutation"] is False  # its interval reaches past 0
    assert checks["map_recovers_70pct_of_the_oracle_gain"] is False
    assert checks["map_beats_its_permutation_over_its_modules"] is True
    assert checks["map_beats_its_permutation_over_every_target"] is None  # not in this run
    assert checks["precision_at_least_0.8"] is True and checks["precision_with_partners_at_least_0.8"] is None
    assert checks["precision_same_mlp_at_least_0.8"] is None  # not given
    assert bench.acceptance(arms, {}, {}, same_mlp={bench.DEFAULT_SIGNAL: 0.79})["precision_same_mlp_at_least_0.8"] is False
    assert checks["map_forgets_no_more_than_flat"] is False  # significantly more forgetting
    assert checks["two_seeds_agree_at_least_0.95"] is None  # no differential control in this run

    differential = {"own_samples_top10_share": [0.6, 0.7], "own_below_every_planted": False,
                    "spearman_same_data_two_seeds": [0.97, 0.94], "spearman_two_plants": [0.2, 0.5],
                    "relative_fall": {"teacher": [0.01]}, "teacher_fall_below_every_planted": True}
    agreement = {"spearman_two_seeds": [0.96, 0.99], "spearman_two_plants": [0.3, 0.51]}
    checks = bench.acceptance(arms, {}, {}, differential, agreement)
    assert checks["own_samples_less_concentrated_than_every_plant"] is False
    assert checks["two_seeds_agree_at_least_0.95"] is False  # one pair of seeds at 0.94
    assert checks["two_plants_differ_at_most_0.5"] is True  # 0.5 itself passes
    assert checks["two_seeds_maps_agree_at_least_0.95"] is True
    assert checks["two_plants_maps_differ_at_most_0.5"] is False  # one pair of plants at 0.51
    assert checks["teacher_loss_fall_below_every_plant"] is True


def test_same_mlp_precision_counts_any_projection_of_a_planted_mlp():
    load_bench("planted")  # puts bench/ on the path
    from planted_lib.runner import mlp_of
    assert mlp_of("layers.3.mlp.down_proj") == mlp_of("layers.3.mlp.gate_proj") == "layers.3.mlp"
    assert mlp_of("layers.13.mlp.up_proj") == "layers.13.mlp" != mlp_of("layers.1.mlp.up_proj")
    assert mlp_of("layers.3.self_attn.o_proj") is None and mlp_of("layers.3.cross_attn.v_proj") is None


def test_map_agreement_is_the_budget_two_maps_share():
    same = {"a": 100, "b": 50, "c": 0}
    cells = [{"plant": 0, "map_params": same}, {"plant": 0, "map_params": dict(same)},
             {"plant": 1, "map_params": {"a": 0, "b": 30, "c": 120}}, {"plant": 1, "map_params": same}]
    agree = load_bench("planted").map_agreement(cells)
    assert agree["budget_shared_two_seeds"] == [1.0, 30 / 150]
    assert agree["spearman_two_seeds"][0] == pytest.approx(1.0)
    assert agree["budget_shared_two_plants"] == [30 / 150]


@pytest.mark.xfail(strict=False, reason="open (issue 18): the contrast is within noise (fails at 24 samples)")
def test_need_is_less_concentrated_on_the_models_own_samples(quick_run):
    assert quick_run[0]["differential_control"]["need"]["own_below_every_planted"]


def test_two_seeds_of_the_same_data_give_the_same_need(quick_run):
    assert min(quick_run[0]["differential_control"]["need"]["spearman_same_data_two_seeds"]) >= 0.95


@pytest.mark.xfail(strict=True, reason="open (issue 18): the need map still describes the model more than the plant")
def test_two_plants_give_different_need_maps(quick_run):
    assert max(quick_run[0]["differential_control"]["need"]["spearman_two_plants"]) <= 0.5


# The probe (the default signal, shares by integrated gradients). Full benchmark, 40 steps: two plants 0.14–0.57,
# two seeds 0.60–0.85, own samples 0.67–0.75 against 0.65–0.84 planted. At these toy sizes: two plants 0.77,
# two seeds 0.71–0.80, own samples 0.40–0.43 against 0.27–0.43 planted.
# Averaging probes (--probe-repeats) does not close it: with 8 probes (offline, 12 plants) two seeds agree at
# 0.79–0.96 while 50 of 66 pairs of plants rise above 0.5 (docs/data-awareness.md, "Averaging more probes").
@pytest.mark.xfail(strict=True, reason="open (issue 18): which stand-in module takes the probe's fix depends on "
                                       "its seed, so the low-score tail reorders")
def test_two_seeds_of_the_same_data_give_the_same_probe_map(quick_run):
    assert min(quick_run[0]["differential_control"]["probe"]["spearman_same_data_two_seeds"]) >= 0.95


@pytest.mark.xfail(strict=True, reason="open (issue 18): 0.14–0.57 in the full benchmark, 0.77 at toy sizes")
def test_two_plants_give_different_probe_maps(quick_run):
    assert max(quick_run[0]["differential_control"]["probe"]["spearman_two_plants"]) <= 0.5


@pytest.mark.xfail(strict=False, reason="open (issue 18): own samples 0.67–0.75 vs planted 0.65–0.84 in the full run")
def test_probe_is_less_concentrated_on_the_models_own_samples(quick_run):
    assert quick_run[0]["differential_control"]["probe"]["own_below_every_planted"]


# The teacher analysed on the planted task's data (a model that already generates that law, so the data asks it
# for nothing). Full benchmark: its probe removes 0.6–1.0% of its loss against 10–27% for the planted bases, and
# its top-10% share is below every planted one on plants 0–3 (0.52–0.64 vs 0.65–0.84) but not on 4–7 (0.53–0.61
# vs 0.55–0.86). At toy sizes the plants do little damage, yet the falls still separate the two: 0.8–1.0% for the
# teacher against 1.3–1.5% planted, while the top-10% shares overlap.
def test_probe_removes_less_of_the_teachers_loss_than_of_any_planted_base(quick_run):
    control = quick_run[0]["differential_control"]["probe"]
    assert control["teacher_fall_below_every_planted"]
    assert max(control["relative_fall"]["teacher"]) < min(control["relative_fall"]["planted"])


@pytest.mark.xfail(strict=True, reason="open (issue 18): holds on plants 0–3 of the full benchmark, not on 4–7 "
                                       "nor at toy sizes")
def test_probe_is_less_concentrated_for_the_teacher_than_for_any_planted_base(quick_run):
    assert quick_run[0]["differential_control"]["probe"]["teacher_below_every_planted"]
