"""Preprocessing++ library: the one-pass Fisher engine, convergence math, signals, allocation into a map."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sidestep.analysis.config import AnalysisConfig, RankSignal
from sidestep.analysis.convergence import ConvergenceTracker, mean_pairwise_spearman, spearman
from sidestep.analysis.engine import FisherEngine, run_analysis, run_subset
from sidestep.analysis.fisher_map import read_map
from sidestep.analysis.modules import Category, category_of, targetable_modules
from sidestep.analysis.run import analyze_dataset
from sidestep.analysis.signals import energy_rank, low_confidence, weight_effective_rank
from sidestep.data import DatasetSpec, collate, load_sample
from sidestep.errors import ConfigError, Interrupted
from sidestep.models import find_model, load_model, original_to_diffusers, resolve_runtime
from sidestep.objective import flow_matching_loss, noise_like
from sidestep.testing.tiny import tiny_config, write_original_checkpoint

GOLDEN_V2 = Path(__file__).parent / "golden" / "sidestep_v2_fisher_map.json"
SMALL = dict(base_rank=8, rank_min=4, rank_max=16, batches_per_run=4, runs=2, probe_steps=3)


@pytest.fixture(scope="module")
def entry(checkpoint_root):
    return find_model(checkpoint_root, "base")


@pytest.fixture(scope="module")
def loaded(entry):
    return load_model(entry, resolve_runtime("cpu", "fp32", False))


@dataclass(frozen=True)
class Analysed:
    """One analysis of the 6-sample dataset with the SMALL settings, shared by the tests of this module."""

    folder: Path
    outcome: object
    forward_calls: int


@pytest.fixture(scope="module")
def analysed(entry, loaded, _dataset_template, tmp_path_factory) -> Analysed:
    folder = tmp_path_factory.mktemp("analysed") / "dataset"
    shutil.copytree(_dataset_template, folder)
    calls = []
    handle = loaded.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        outcome = _analyze(folder, entry, loaded, keep_sketches=True)
    finally:
        handle.remove()
    return Analysed(folder, outcome, len(calls))


def _batches(loaded, files, count, seed=0):
    spec = DatasetSpec.from_model_config(loaded.entry.config)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for path in files[:count]:
        batch = collate([load_sample(path, spec)])
        t = torch.rand(1, generator=gen)
        out.append((batch, t, noise_like(batch.target_latents, gen)))
    return out


def _analyze(dataset_dir, entry, loaded, confirm=None, **overrides):
    config = AnalysisConfig(dataset_dir=dataset_dir, **{**SMALL, **overrides})
    return analyze_dataset(config, entry, loaded.runtime, confirm=confirm, loader=lambda _e, _r: loaded)


# ---- the engine ------------------------------------------------------------------------------------


def _hook_vs_plain(model, names, batches, rtol):
    """Fisher sums and sketches from the hooked engine vs autograd.grad on the same batches."""
    with FisherEngine(model, names, sketch_k=12, seed=5) as engine:
        for batch, t, noise in batches:
            engine.step(batch, t, noise)
        hooked = engine.fisher_sums()
        sketches = [z.clone() for z in engine.sketch]
        psis = [engine.psi(i) for i in range(len(names))]
    assert not any(p.requires_grad for p in model.parameters())
    modules = dict(model.named_modules())
    weights = [modules[original_to_diffusers(n)].weight for n in names]
    expected = np.zeros(len(names))
    expected_z = [torch.zeros_like(z) for z in sketches]
    for w in weights:
        w.requires_grad_(True)
    try:
        for batch, t, noise in batches:
            grads = torch.autograd.grad(flow_matching_loss(model, batch, t, noise), weights)
            for i, g in enumerate(grads):
                expected[i] += float(g.double().pow(2).sum())
                expected_z[i] += g.float().t() @ psis[i].float()
    finally:
        for w in weights:
            w.requires_grad_(False)
    assert expected.min() > 0
    np.testing.assert_allclose(hooked, expected, rtol=rtol)
    for z, ez in zip(sketches, expected_z):
        # A low-precision product rounds each entry: compare on the sketch's own scale.
        torch.testing.assert_close(z, ez, rtol=10 * rtol, atol=10 * rtol * float(ez.abs().max()))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_hook_fisher_and_sketch_equal_plain_grad_computation(loaded, dataset_dir, checkpointing):
    model = loaded.transformer
    batches = _batches(loaded, sorted(dataset_dir.glob("*.pt")), 3)
    if checkpointing:
        model.enable_gradient_checkpointing()
    try:
        _hook_vs_plain(model, targetable_modules(loaded.num_layers), batches, rtol=1e-5)
    finally:
        model.disable_gradient_checkpointing()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_cuda_engine_matches_plain_grad_and_analysis_runs(entry, dataset_dir, precision, rtol):
    runtime = resolve_runtime("cuda", precision, True)
    on_gpu = load_model(entry, runtime)
    batches = [(b.to(runtime.device, runtime.dtype), t, n.to(runtime.device, runtime.dtype))
               for b, t, n in _batches(on_gpu, sorted(dataset_dir.glob("*.pt")), 3)]
    _hook_vs_plain(on_gpu.transformer, targetable_modules(on_gpu.num_layers), batches, rtol=rtol)
    outcome = _analyze(dataset_dir, entry, on_gpu)
    assert statistics.median(outcome.map.rank_pattern.values()) == 8
    assert all(m.fisher > 0 for m in outcome.result.modules)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_engine_matches_plain_grad_and_the_analysis_agrees_with_fp32(entry, dataset_dir, analysed,
                                                                                      precision):
    # The CPU runs the bf16 and fp16 kernels too, so the paths a GPU without bf16 (fp16: T4, V100, MPS) takes are
    # tested here, not only on CUDA: the hooks see the same gradients as autograd, and the analysis, probe
    # included, ranks the modules as fp32 does.
    low = load_model(entry, resolve_runtime("cpu", precision, False))
    batches = [(b.to(low.runtime.device, low.runtime.dtype), t, n.to(low.runtime.device, low.runtime.dtype))
               for b, t, n in _batches(low, sorted(dataset_dir.glob("*.pt")), 3)]
    _hook_vs_plain(low.transformer, targetable_modules(low.num_layers), batches, rtol=2e-2)
    folder = analysed.folder.parent / f"dataset-{precision}"
    shutil.copytree(analysed.folder, folder, ignore=shutil.ignore_patterns("fisher_*"))
    outcome = _analyze(folder, entry, low)
    reference = {m.name: m.fisher for m in analysed.outcome.result.modules}
    fisher = {m.name: m.fisher for m in outcome.result.modules}
    assert all(math.isfinite(v) and v > 0 for v in fisher.values())
    assert spearman(np.array([reference[n] for n in fisher]), np.array(list(fisher.values()))) > 0.99
    probe = outcome.result.probe
    assert probe.lr_used == probe.settings.lr and probe.loss_probed < probe.loss_before


def test_one_forward_and_backward_per_batch_and_state_restored(loaded, analysed):
    # The hook analysis: one forward (and backward) per batch. The default probe adds its own passes, counted
    # here so that its cost is pinned too: steps × batch training passes, then, per evaluation sample, one pass
    # without the probe and one with it, and one pass (with its backward) per path point and draw. None of it
    # grows with the number of modules (switching each module's adapter off in turn did: 266 passes per sample
    # on the 2B model).
    probe = analysed.outcome.result.probe.settings
    eval_items = min(probe.eval_samples, len(list(analysed.folder.glob("*.pt"))))
    probe_passes = probe.steps * probe.batch + eval_items * (2 + probe.points * probe.eval_draws)
    assert analysed.outcome.result.total_batches == 8 and analysed.forward_calls == 8 + probe_passes
    assert not any(p.requires_grad for p in loaded.transformer.parameters())
    assert all(p.grad is None for p in loaded.transformer.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in loaded.transformer.parameters())


def test_result_holds_every_module_with_signals(loaded, analysed):
    result = analysed.outcome.result
    sketch_k = AnalysisConfig(dataset_dir=analysed.folder, **SMALL).sketch_k
    assert [m.name for m in result.modules] == targetable_modules(loaded.num_layers)
    assert all(m.fisher > 0 and m.fisher_std >= 0 for m in result.modules)
    assert all(1 <= m.data_rank <= min(sketch_k, m.in_features, m.out_features) for m in result.modules)
    assert all(m.weight_rank is not None and 1 <= m.weight_rank <= min(m.in_features, m.out_features)
               for m in result.modules)
    assert len(result.runs) == 2 and all(r.batches == 4 and len(r.files) == 4 for r in result.runs)
    assert result.cross_run_spearman is not None and -1 <= result.cross_run_spearman <= 1
    z = result.sketches["layers.0.mlp.down_proj"]
    assert z.shape == (128, min(sketch_k, 64)) and z.device.type == "cpu"


def test_should_stop_raises_interrupted_and_restores_model(loaded, dataset_dir):
    config = AnalysisConfig(dataset_dir=dataset_dir, **SMALL)
    polls = iter([False, False, True])
    with pytest.raises(Interrupted):
        run_analysis(config, loaded, sorted(dataset_dir.glob("*.pt")), should_stop=lambda: next(polls))
    assert not any(p.requires_grad or p.grad is not None for p in loaded.transformer.parameters())


def test_run_subsets_are_seeded_and_differ_between_runs(tmp_path):
    files = [tmp_path / f"s{i:02d}.pt" for i in range(20)]
    assert run_subset(files, 5, 42, 0) == run_subset(list(reversed(files)), 5, 42, 0)
    assert run_subset(files, 5, 42, 0) != run_subset(files, 5, 42, 1)
    assert run_subset(files, 5, 42, 0) != run_subset(files, 5, 43, 0)
    assert len(set(run_subset(files, 20, 1, 0))) == 20


# ---- pure math -------------------------------------------------------------------------------------


def test_spearman_handles_ties_and_constants():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: centred dot 4.5, norms² 4.5 and 5 (same as scipy.stats.spearmanr)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([5, 5, 5], [5, 5, 5]) == 1.0 and spearman([5, 5, 5], [1, 2, 3]) == 0.0
    assert mean_pairwise_spearman([[1, 2, 3]]) is None
    assert mean_pairwise_spearman([[1, 2, 3], [1, 2, 3], [3, 2, 1]]) == pytest.approx(-1 / 3)


def test_convergence_needs_patience_stable_checks_against_patience_back():
    tracker = ConvergenceTracker(patience=2, threshold=0.98)
    stable = [1.0, 2.0, 3.0, 4.0]
    assert not tracker.update(stable) and not tracker.update(stable)  # nothing 2 batches back yet
    assert not tracker.update(stable) and tracker.streak == 1
    assert tracker.update(stable) and tracker.last == pytest.approx(1.0)
    flip = ConvergenceTracker(patience=1, threshold=0.98)
    flip.update([1, 2, 3])
    assert not flip.update([3, 2, 1]) and flip.last == pytest.approx(-1.0) and flip.streak == 0


def test_energy_rank_and_weight_effective_rank():
    assert energy_rank([3.0, 1.0, 0.0], 0.9) == 1  # 9 of 10
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 0.9) == 4
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 0.5) == 2
    assert energy_rank([0.0, 0.0], 0.9) == 0
    weight = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))  # energy 9, 4, 1, 0.25: 13/14.25 < 0.95 <= 14/14.25
    assert weight_effective_rank(weight) == 3
    assert low_confidence({"a": 1.0, "b": 1.0}, {"a": 0.6, "b": 0.4}) == ["a"]


# ---- the map ---------------------------------------------------------------------------------------


def test_map_required_keys_types_and_contract(analysed):
    outcome, dataset_dir = analysed.outcome, analysed.folder
    assert outcome.path == dataset_dir / "fisher_map.json" and (dataset_dir / "fisher_map.png").is_file()
    data = json.loads(outcome.path.read_text(encoding="utf-8"))
    types = {
        "version": int, "model_variant": str, "timestep_focus": str, "timestep_range": list, "timestep_params": dict,
        "num_runs": int, "batches_per_run": int, "total_batches": int, "base_rank": int, "rank_budget": dict,
        "dataset_hash": str, "target_modules": list, "rank_pattern": dict, "alpha_pattern": dict, "modules": list,
        "excluded_modules": list, "sample_coverage": list, "num_hidden_layers": int, "created_at": str,
        "seed": int, "rank_signal": str, "budget_mode": str, "rank_step": int, "alpha_ratio": float,
        "trainable_params": int, "flat_equivalent_params": int, "convergence": dict, "low_confidence_modules": list,
        "content_hash": str, "report": str, "tool": dict,
    }
    for key, kind in types.items():
        assert isinstance(data[key], kind), key
    assert data["version"] == 3 and data["model_variant"] == "base" and data["num_hidden_layers"] == 4
    assert data["timestep_params"] == {"mu": -0.4, "sigma": 1.0, "data_proportion": 0.5}
    assert data["rank_budget"] == {"min": 4, "max": 16} and data["report"] == "fisher_map.png"
    assert len(data["dataset_hash"]) == 12 and data["num_runs"] == 2 and data["total_batches"] == 8
    for module in data["modules"]:
        assert module["name"].startswith("decoder.layers.")
        assert {"fisher_score", "fisher_cross_run_std", "effective_rank", "assigned_rank", "data_rank", "category"} <= set(module)
    scores = [m["fisher_score"] for m in data["modules"]]
    assert scores == sorted(scores, reverse=True)
    assert set(data["rank_pattern"]) | set(data["excluded_modules"]) == set(targetable_modules(4))
    assert [c["run"] for c in data["sample_coverage"]] == [1, 2]
    assert all(c["selected_count"] == 4 and c["total_count"] == 6 for c in data["sample_coverage"])
    ranks = list(data["rank_pattern"].values())
    step = data["rank_step"]
    assert statistics.median(ranks) == 8
    assert all(4 <= r <= 16 and r % step == 0 for r in ranks)
    assert all(data["alpha_pattern"][k] == 2 * r for k, r in data["rank_pattern"].items())
    for category in Category:
        members = [n for n in targetable_modules(4) if category_of(n) is category]
        kept = [n for n in data["rank_pattern"] if category_of(n) is category]
        assert len(kept) >= max(1, math.ceil(0.1 * len(members)))
    assert read_map(outcome.path).rank_pattern == data["rank_pattern"]


@pytest.mark.slow
def test_same_seed_gives_identical_map_and_bak_is_kept(loaded, entry, analysed, tmp_path):
    dataset_dir = tmp_path / "dataset"
    shutil.copytree(analysed.folder, dataset_dir)  # with the shared analysis's map in it
    text1 = (dataset_dir / "fisher_map.json").read_text(encoding="utf-8")
    second = _analyze(dataset_dir, entry, loaded, keep_sketches=True)
    assert second.backup == dataset_dir / "fisher_map.json.bak"
    assert second.backup.read_text(encoding="utf-8") == text1
    a, b = json.loads(text1), json.loads(second.path.read_text(encoding="utf-8"))
    a.pop("created_at"), b.pop("created_at")
    assert a == b
    other = _analyze(dataset_dir, entry, loaded, seed=7, output=dataset_dir / "other.json")
    assert json.loads(other.path.read_text(encoding="utf-8"))["seed"] == 7
    assert other.report_png == dataset_dir / "other.png"


@pytest.mark.slow
def test_flat_budget_spends_the_flat_parameter_count(loaded, entry, dataset_dir):
    outcome = _analyze(dataset_dir, entry, loaded, budget="flat")
    fmap, result = outcome.map, outcome.result
    largest = max(m.in_features + m.out_features for m in result.modules)
    assert fmap.budget_mode == "flat"
    assert abs(fmap.trainable_params - fmap.flat_equivalent_params) <= fmap.rank_step * largest
    assert fmap.flat_equivalent_params == 8 * sum(m.in_features + m.out_features for m in result.modules)
    assert all(4 <= r <= 16 and r % fmap.rank_step == 0 for r in fmap.rank_pattern.values())


@pytest.mark.slow  # the default signal's map is already checked on the shared analysis
@pytest.mark.parametrize("signal", list(RankSignal), ids=[s.value for s in RankSignal])
def test_every_rank_signal_keeps_the_median(loaded, entry, dataset_dir, signal):
    outcome = _analyze(dataset_dir, entry, loaded, rank_signal=signal.value, confirm=lambda _m: False)
    assert outcome.path is None and not (dataset_dir / "fisher_map.json").exists()
    assert statistics.median(outcome.map.rank_pattern.values()) == 8
    assert outcome.map.rank_signal == signal.value


@pytest.mark.slow
def test_custom_focus_is_recorded_and_bad_focus_is_one_sentence(loaded, entry, dataset_dir):
    outcome = _analyze(dataset_dir, entry, loaded, timestep_focus="0.2,0.7", confirm=lambda _m: False)
    assert outcome.map.timestep_focus == "0.2,0.7" and outcome.map.timestep_range == (0.2, 0.7)
    for bad in ("0.8,0.2", "loud", "0.1,1.5", "a,b"):
        with pytest.raises(ConfigError, match="--timestep-focus"):
            AnalysisConfig(dataset_dir=dataset_dir, timestep_focus=bad)


def test_keyboard_interrupt_during_the_run_writes_nothing(loaded, entry, dataset_dir):
    def explode(progress):
        if progress.done == 3:
            raise KeyboardInterrupt

    config = AnalysisConfig(dataset_dir=dataset_dir, **SMALL)
    with pytest.raises(Interrupted):
        analyze_dataset(config, entry, loaded.runtime, on_progress=explode, loader=lambda _e, _r: loaded)
    assert sorted(p.name for p in dataset_dir.iterdir()) == [f"song_{i:02d}.pt" for i in range(6)]
    assert not any(p.requires_grad for p in loaded.transformer.parameters())


def test_turbo_needs_explicit_opt_in(tmp_path, dataset_dir):
    cfg = tiny_config(num_layers=2, hidden=64, is_turbo=True, model_version="turbo")
    write_original_checkpoint(tmp_path / "ck", cfg, folder="acestep-v15-turbo")
    turbo = find_model(tmp_path / "ck", "turbo")
    runtime = resolve_runtime("cpu", "fp32", False)
    with pytest.raises(ConfigError, match="--allow-turbo"):
        analyze_dataset(AnalysisConfig(dataset_dir=dataset_dir, **SMALL), turbo, runtime)
    assert not (dataset_dir / "fisher_map.json").exists()
    seen = []
    outcome = analyze_dataset(AnalysisConfig(dataset_dir=dataset_dir, allow_turbo=True, **SMALL), turbo, runtime,
                              on_warning=seen.append)
    assert outcome.map.model_variant == "turbo" and "5e-5" in seen[0]


@pytest.mark.slow
def test_small_dataset_warns(loaded, entry, dataset_dir):
    for path in sorted(dataset_dir.glob("*.pt"))[3:]:
        path.unlink()
    outcome = _analyze(dataset_dir, entry, loaded, confirm=lambda _m: False)
    assert any("unreliable" in w for w in outcome.warnings)


def test_reference_v2_map_is_readable():
    fmap = read_map(GOLDEN_V2)
    data = json.loads(GOLDEN_V2.read_text(encoding="utf-8"))
    assert fmap.version == 2 and fmap.rank_pattern == data["rank_pattern"]
    assert fmap.alpha_pattern == data["alpha_pattern"]
    assert set(fmap.target_modules) == set(data["target_modules"])
