"""`sidestep analyze` end to end on the tiny real architecture: flags, bad input, confirmation, --json."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidestep.testing.tiny import tiny_config, write_original_checkpoint

from cli_support import run_cli as _main

FAST = ["--rank", "8", "--rank-min", "4", "--rank-max", "16", "--batches-per-run", "3", "--runs", "2",
        "--device", "cpu", "--precision", "fp32", "--probe-steps", "3"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, *extra: str, stdin=None):
    return _main(monkeypatch, capsys, "analyze", "--dataset-dir", str(dataset_dir),
                 "--checkpoint-dir", str(checkpoint_root), *FAST, *extra, stdin=stdin)


def _written(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".pt"))


def test_yes_json_writes_map_png_and_summary(monkeypatch, capsys, checkpoint_root, dataset_dir):
    code, out, err = _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, "--yes", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["saved"] and summary["path"] == str(dataset_dir / "fisher_map.json")
    assert summary["report"] == str(dataset_dir / "fisher_map.png") and summary["num_runs"] == 2
    assert summary["total_batches"] == 6 and summary["ranks"]["base"] == 8
    assert _written(dataset_dir) == ["fisher_init.safetensors", "fisher_map.json", "fisher_map.png"]
    assert "Rank histogram" in err and "trainable parameters" in err
    assert "5e-5" in err  # the learning-rate advice
    # The probe set the ranks: the preview's top modules are the probe's, and the Fisher runs (3 batches cannot meet
    # a patience of 5) are reported without calling the map less certain, since its ranks do not depend on them.
    assert "Top 5 modules by their share of the probe's loss fall" in err and "Fisher runs (the probe set the ranks" in err
    assert "did not converge" not in err
    # The default signal is the probe: its settings, per-module scores and concentration, in the map, the preview
    # and --json; the need field (per-module noise-free need) is still written beside it.
    data = json.loads((dataset_dir / "fisher_map.json").read_text(encoding="utf-8"))
    probe, need = data["probe"], data["need"]
    assert data["rank_signal"] == "probe" and (probe["steps"], probe["lr"], probe["lr_used"]) == (3, 0.01, 0.01)
    targetable = {m for m in data["rank_pattern"]} | set(data["excluded_modules"])
    assert set(probe["per_module"]) == set(need["per_module"]) == targetable
    assert 0 < probe["top10_share"] <= 1 and summary["top10_share"] == probe["top10_share"]
    assert summary["spread_evenly"] == probe["spread_evenly"] and summary["concentration_measure"] == "probe loss fall"
    assert ("the probe loss fall is spread evenly" in err) or ("the probe loss fall is concentrated" in err)
    # how much the data asks at all: the share of the loss the probe removed, from the losses the map records
    fall = (probe["loss_before"] - probe["loss_probed"]) / probe["loss_before"]
    assert 0 < fall < 1 and summary["probe_loss_fall"] == pytest.approx(fall)
    # --json lists the preview's top modules: the largest shares of the probe's fall, as the preview ranks them
    assert summary["top_modules_by"] == "the probe's loss fall" and len(summary["top_modules"]) == 5
    shares = [m["share"] for m in summary["top_modules"]]
    largest = max(v["loss_share"] for v in probe["per_module"].values())
    assert shares == sorted(shares, reverse=True) and shares[0] == pytest.approx(largest / (fall * probe["loss_before"]))
    at_cap = sum(r == data["rank_budget"]["max"] for r in data["rank_pattern"].values())
    assert summary["modules_at_rank_max"] == at_cap
    assert f"The probe lowered the model's loss on this data by {fall:.1%}." in err


def test_probe_signal_runs_the_probe_with_the_given_steps_lr_and_repeats(monkeypatch, capsys, checkpoint_root, dataset_dir):
    code, out, err = _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, "--yes", "--json", "--rank-signal",
                              "probe", "--probe-steps", "3", "--probe-lr", "0.02", "--probe-repeats", "2",
                              "--budget", "flat")
    assert code == 0, err
    data = json.loads((dataset_dir / "fisher_map.json").read_text(encoding="utf-8"))
    assert data["rank_signal"] == "probe"
    assert (data["probe"]["steps"], data["probe"]["lr"], data["probe"]["repeats"]) == (3, 0.02, 2)
    scores = {n: v["score"] for n, v in data["probe"]["per_module"].items()}
    assert max(scores, key=scores.get) in data["rank_pattern"]


def test_need_signal_water_fills_the_flat_budget(monkeypatch, capsys, checkpoint_root, dataset_dir):
    code, out, err = _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, "--yes", "--json",
                              "--rank-signal", "need", "--budget", "flat")
    assert code == 0, err
    data = json.loads((dataset_dir / "fisher_map.json").read_text(encoding="utf-8"))
    assert data["rank_signal"] == "need" and data["budget_mode"] == "flat"
    assert "probe" not in data and json.loads(out)["concentration_measure"] == "need"  # no probe run: need reports
    # the need comes from the Fisher runs' sketches: 3 batches cannot meet a patience of 5, so the map is less certain
    assert "Top 5 modules by their share of the need" in err and "Runs 1, 2 of 2 did not converge" in err
    step = data["rank_step"]
    for name in data["rank_pattern"]:
        assert data["rank_budget"]["min"] <= data["rank_pattern"][name] <= data["rank_budget"]["max"]
    assert abs(data["trainable_params"] - data["flat_equivalent_params"]) <= step * 256  # one step of a module wider than any here
    # The modules with the most need per parameter get an adapter before those with the least.
    per = {n: v["need_per_param"] for n, v in data["need"]["per_module"].items()}
    adapted = set(data["rank_pattern"])
    if data["excluded_modules"]:
        assert min(per[n] for n in adapted) >= min(per[n] for n in data["excluded_modules"])


@pytest.mark.slow
def test_prompt_yes_saves_and_prompt_no_writes_nothing(monkeypatch, capsys, checkpoint_root, dataset_dir):
    code, _, err = _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, stdin=_Tty("n\n"))
    assert code == 0 and "Save fisher_map.json?" in err and "nothing was written" in err
    assert _written(dataset_dir) == []
    code, _, err = _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, "--budget", "flat",
                            "--timestep-focus", "texture", stdin=_Tty("y\n"))
    assert code == 0, err
    data = json.loads((dataset_dir / "fisher_map.json").read_text(encoding="utf-8"))
    assert data["budget_mode"] == "flat" and data["timestep_focus"] == "texture"
    assert data["timestep_range"] == [0.0, 0.4]


@pytest.mark.slow
def test_enter_at_the_save_prompt_saves_and_keeps_the_old_map_as_bak(monkeypatch, capsys, checkpoint_root,
                                                                     dataset_dir):
    (dataset_dir / "fisher_map.json").write_text('{"old": true}\n', encoding="utf-8")
    code, _, err = _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, stdin=_Tty("\n"))  # Enter: default Yes
    assert code == 0, err
    assert "Save fisher_map.json? [y/n] (y)" in err
    assert (dataset_dir / "fisher_map.json.bak").read_text(encoding="utf-8") == '{"old": true}\n'
    assert "fisher_map.json.bak" in err


def test_keyboard_interrupt_exits_130_and_writes_nothing(monkeypatch, capsys, checkpoint_root, dataset_dir):
    from sidestep.analysis import engine

    real_step = engine.FisherEngine.step
    calls = []

    def step(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(engine.FisherEngine, "step", step)
    code, _, err = _analyze(monkeypatch, capsys, checkpoint_root, dataset_dir, "--yes")
    assert code == 130 and "nothing was written" in err and "Traceback" not in err
    assert _written(dataset_dir) == []


def _turbo_root(tmp_path: Path) -> Path:
    root = tmp_path / "turbo_ck"
    write_original_checkpoint(root, tiny_config(num_layers=2, hidden=64, is_turbo=True), folder="acestep-v15-turbo")
    return root


BAD = [
    ("rank 0", ["--rank", "0"], "--rank"),
    ("min above max", ["--rank-min", "32", "--rank-max", "16"], "--rank-min"),
    ("rank outside", ["--rank", "64"], "--rank 64"),
    ("focus reversed", ["--timestep-focus", "0.8,0.2"], "--timestep-focus"),
    ("focus unknown", ["--timestep-focus", "loud"], "--timestep-focus"),
    ("runs 0", ["--runs", "0"], "--runs"),
    ("batches 0", ["--batches-per-run", "0"], "--batches-per-run"),
    ("patience 0", ["--convergence-patience", "0"], "--convergence-patience"),
    ("budget", ["--budget", "wide"], "--budget"),
    ("signal", ["--rank-signal", "magic"], "--rank-signal"),
    ("alpha", ["--alpha-ratio", "0"], "--alpha-ratio"),
    ("probe lr", ["--probe-lr", "5"], "--probe-lr"),
    ("probe repeats", ["--probe-repeats", "0"], "--probe-repeats"),
    ("rank max above a module", ["--rank-max", "64"], "--rank-max 64 is more than"),
    ("seed", ["--seed", "-1"], "--seed"),
    ("no tty", ["--no-yes"], "--yes"),
    ("output folder", ["--output", "{tmp}/missing/fisher_map.json"], "does not exist"),
    ("output is dir", ["--output", "{tmp}"], "is a folder"),
    ("device", ["--device", "tpu"], "--device"),
    ("model", ["--model", "sft"], "No model 'sft'"),
    ("dataset missing", ["--dataset-dir", "{tmp}/nope"], "does not exist"),
    ("dataset empty", ["--dataset-dir", "{tmp}/empty"], "has no .pt files"),
    ("corrupt sample", ["--corrupt"], "song_00.pt"),
    ("no checkpoint dir", ["--no-checkpoint-dir"], "--checkpoint-dir"),
    ("turbo", ["--turbo"], "--allow-turbo"),
]


@pytest.mark.parametrize("label, args, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_line_and_writes_nothing(monkeypatch, capsys, checkpoint_root, dataset_dir, tmp_path,
                                                        label, args, needle):
    (tmp_path / "empty").mkdir()
    head = ["analyze", "--dataset-dir", str(dataset_dir), "--checkpoint-dir", str(checkpoint_root)]
    tail = [a.replace("{tmp}", str(tmp_path)) for a in args]
    yes = ["--yes"]
    if tail == ["--no-yes"]:
        tail, yes = [], []
    elif tail == ["--corrupt"]:
        tail = []
        (dataset_dir / "song_00.pt").write_bytes(b"not a tensor file")
    elif tail == ["--no-checkpoint-dir"]:
        tail, head = [], head[:3]
    elif tail == ["--turbo"]:
        tail, head = ["--model", "turbo"], head[:3] + ["--checkpoint-dir", str(_turbo_root(tmp_path))]
    code, out, err = _main(monkeypatch, capsys, *head, *FAST, *yes, *tail)
    assert code == 1, err
    assert needle in err and "Traceback" not in err and out == ""
    assert err.count("Error:") == 1
    assert _written(dataset_dir) == [] and not list(tmp_path.rglob("fisher_map*"))


def test_missing_dataset_dir_flag(monkeypatch, capsys, checkpoint_root):
    code, _, err = _main(monkeypatch, capsys, "analyze", "--checkpoint-dir", str(checkpoint_root), "--yes")
    assert code == 1 and "--dataset-dir is required" in err


@pytest.mark.slow
def test_allow_turbo_runs_with_warning(monkeypatch, capsys, dataset_dir, tmp_path):
    code, _, err = _main(monkeypatch, capsys, "analyze", "--dataset-dir", str(dataset_dir), "--checkpoint-dir",
                         str(_turbo_root(tmp_path)), "--model", "turbo", "--allow-turbo", "--yes", *FAST)
    assert code == 0, err
    assert "turbo model" in err and "--ignore-fisher-map" in err
    assert json.loads((dataset_dir / "fisher_map.json").read_text(encoding="utf-8"))["model_variant"] == "turbo"


@pytest.mark.slow
def test_real_process_bad_focus_exits_1_without_traceback(checkpoint_root, dataset_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDESTEP_")}
    env["SIDESTEP_CONFIG_DIR"] = str(tmp_path / "config")
    proc = subprocess.run(
        [sys.executable, "-m", "sidestep", "analyze", "--dataset-dir", str(dataset_dir), "--checkpoint-dir",
         str(checkpoint_root), "--timestep-focus", "0.9,0.1", "--yes"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "--timestep-focus" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""
    assert _written(dataset_dir) == []


def test_progress_bar_names_each_phase():
    from sidestep.analysis.engine import Progress
    from sidestep.cli.analyze_cmd import _ProgressBar

    bar = _ProgressBar()
    try:
        for phase, runs, label in (("fisher", 2, "Fisher run 1/2"), ("probe", 1, "LoRA probe"),
                                   ("probe-attribution", 1, "Probe attribution"), ("probe", 3, "LoRA probe 1/3"),
                                   ("probe-attribution", 3, "Probe attribution 1/3")):
            bar.update(Progress(phase, 1, runs, 3, 10, 3, 10))
            assert bar._bar.tasks[0].description == label
    finally:
        bar.stop()


def test_preview_warns_only_about_runs_that_did_not_converge(capsys):
    from sidestep.analysis.report import Preview
    from sidestep.display.analysis import print_preview

    def preview(runs):
        return Preview(categories=(), rank_histogram=((8, 2),), top=(), low_confidence=(), adapted=2, targetable=4,
                       median_rank=8.0, trainable_params=10, flat_equivalent_params=20, cross_run_spearman=0.9,
                       runs=runs)

    print_preview(preview(((1, 12, 0.99, True), (2, 12, 0.97, True))))
    assert "did not converge" not in capsys.readouterr().err
    print_preview(preview(((1, 12, 0.99, True), (2, 50, 0.61, False))))
    err = capsys.readouterr().err
    assert "Run 2 of 2 did not converge" in err and "less certain" in err


def test_preview_warns_when_rank_max_shaped_a_flat_budget_map(capsys):
    from sidestep.analysis.report import Preview
    from sidestep.display.analysis import print_preview

    def preview(at_cap, flat=True):
        return Preview(categories=(), rank_histogram=((8, 4 - at_cap), (16, at_cap)), top=(), low_confidence=(),
                       adapted=4, targetable=8, median_rank=8.0, trainable_params=10, flat_equivalent_params=10,
                       cross_run_spearman=None, runs=(), at_rank_max=at_cap, rank_max=16, base_rank=8,
                       flat_budget=flat)

    print_preview(preview(0))
    assert "--rank-max" not in capsys.readouterr().err
    print_preview(preview(3, flat=False))  # under the median budget the cap is the reference's rule, not a loss
    assert "--rank-max" not in capsys.readouterr().err
    print_preview(preview(3))
    err = " ".join(capsys.readouterr().err.split())
    assert "3 of the 4 adapted modules are at --rank-max 16" in err and "--rank-max 32 or more lets it" in err


def test_rank_max_defaults_to_room_for_the_flat_budget(tmp_path):
    from sidestep.analysis.config import AnalysisConfig

    # the reference's 128 under the median budget; under the flat budget 4 × --rank when that is more
    assert AnalysisConfig(dataset_dir=tmp_path).rank_max == 128
    assert AnalysisConfig(dataset_dir=tmp_path, budget="flat").rank_max == 256
    assert AnalysisConfig(dataset_dir=tmp_path, budget="flat", base_rank=16, rank_min=8).rank_max == 128
    assert AnalysisConfig(dataset_dir=tmp_path, budget="flat", rank_max=128).rank_max == 128  # given: kept
