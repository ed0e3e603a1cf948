"""`--rank-signal probe`: a short flat LoRA probe, its loss fall shared out by integrated gradients.

Whether the probe finds where a dataset needs change is measured on the planted benchmark (bench/planted.py,
arm map_probe); these tests pin what the library promises: the shares add up to the probe's loss fall, each
agrees with switching that module's adapter off where the modules do not interact, the scores are the shares
per (in + out),
the map is sized from them under the flat budget and records them, the run is reproducible, and the model
comes back exactly as it was.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from sidestep.analysis.allocate import saturating_ranks
from sidestep.analysis.config import AnalysisConfig, RankSignal
from sidestep.analysis.fisher_map import PROBE_FIELD, read_map
from sidestep.analysis.modules import targetable_modules
from sidestep.analysis import probe as probe_module
from sidestep.analysis.probe import ProbeSettings, measure_probe
from sidestep.analysis.run import PROBE_SATURATION, analyze_dataset
from sidestep.data import DatasetSpec, load_sample, scan_dataset
from sidestep.errors import ConfigError, Interrupted
from sidestep.models import find_model, load_model, original_to_diffusers, resolve_runtime
from sidestep.seeding import mix_seed

QUICK = ProbeSettings(steps=4, rank=4, lr=1e-2, batch=2, eval_samples=3, eval_draws=2)


@pytest.fixture(scope="module")
def loaded(checkpoint_root):
    return load_model(find_model(checkpoint_root, "base"), resolve_runtime("cpu", "fp32", False))


@pytest.fixture(scope="module")
def files(loaded, _dataset_template):
    return list(scan_dataset(_dataset_template, DatasetSpec.from_model_config(loaded.entry.config)).files)


def _probe(loaded, files, seed=0, settings=QUICK, should_stop=None, on_progress=None):
    names = targetable_modules(loaded.num_layers)
    spec = DatasetSpec.from_model_config(loaded.entry.config)
    return measure_probe(loaded, names, files, spec, settings, seed, should_stop, on_progress)


def test_scores_are_the_shares_of_the_loss_fall_per_rank_step_cost(loaded, files):
    result = _probe(loaded, files)
    modules = dict(loaded.transformer.named_modules())
    names = targetable_modules(loaded.num_layers)
    assert set(result.scores) == set(names)
    assert result.loss_probed < result.loss_before  # the probe learned something to share out
    # integrated gradients are complete: the shares add up to the whole fall (midpoint rule, 4 points)
    assert sum(result.share.values()) == pytest.approx(result.loss_before - result.loss_probed, rel=0.05)
    for name in names:
        linear = modules[original_to_diffusers(name)]
        expected = max(result.share[name], 1e-12) / (linear.in_features + linear.out_features)
        assert result.scores[name] == pytest.approx(expected, rel=1e-12)


def test_one_module_on_its_own_gets_exactly_its_whole_fall(loaded, files):
    """With a single module probed the path is that module's switch: its share is the fall it alone makes."""
    name = "layers.1.mlp.down_proj"
    spec = DatasetSpec.from_model_config(loaded.entry.config)
    result = measure_probe(loaded, [name], files, spec, replace(QUICK, points=8), 0)
    assert result.loss_probed < result.loss_before
    assert result.share[name] == pytest.approx(result.loss_before - result.loss_probed, rel=0.02)


def test_probe_is_reproducible_and_seeded(loaded, files):
    first, again, other = _probe(loaded, files, 3), _probe(loaded, files, 3), _probe(loaded, files, 4)
    assert first.share == again.share
    assert first.share != other.share


def test_probe_leaves_the_model_exactly_as_it_was(loaded, files):
    model = loaded.transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    _probe(loaded, files)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


def test_stop_request_interrupts_the_probe_and_removes_its_hooks(loaded, files):
    calls = []
    hooks = sum(len(m._forward_hooks) for m in loaded.transformer.modules())
    with pytest.raises(Interrupted):
        _probe(loaded, files, should_stop=lambda: len(calls) > 2 or calls.append(1))
    assert sum(len(m._forward_hooks) for m in loaded.transformer.modules()) == hooks


def test_analyze_with_the_probe_signal_sizes_the_map_from_the_probe_and_records_it(loaded, _dataset_template,
                                                                                   tmp_path):
    folder = tmp_path / "dataset"
    shutil.copytree(_dataset_template, folder)
    config = AnalysisConfig(dataset_dir=folder, base_rank=8, rank_min=2, rank_max=32, rank_step=2, budget="flat",
                            batches_per_run=3, runs=1, rank_signal="probe", probe_steps=4, probe_rank=4,
                            probe_lr=1e-2, write_init=False)
    phases = []
    outcome = analyze_dataset(config, loaded.entry, loaded.runtime, loader=lambda _e, _r: loaded,
                              on_progress=lambda p: phases.append((p.phase, p.done, p.total)))
    fmap = read_map(outcome.path)
    assert fmap.rank_signal == RankSignal.PROBE.value
    probe_phases = [p for p in phases if p[0].startswith("probe")]  # the bars name them: steps, then attribution
    assert {p[0] for p in probe_phases[:4]} == {"probe"} and probe_phases[-1][0] == "probe-attribution"
    assert probe_phases[-1][1] == probe_phases[-1][2]
    assert outcome.result.seconds > outcome.result.probe.seconds > 0  # the reported time includes the probe
    field = fmap.extra[PROBE_FIELD]
    assert (field["steps"], field["rank"], field["lr"]) == (4, 4, 1e-2)
    scores = {n: v["score"] for n, v in field["per_module"].items()}
    assert set(scores) == set(targetable_modules(loaded.num_layers))
    # --budget flat water-fills on the probe's shares, with a gain that saturates every 2·--rank ranks
    shares = {n: v["loss_share"] for n, v in field["per_module"].items()}
    shapes = {m.name: m.shape for m in outcome.result.modules}
    expected = saturating_ranks(shares, shapes, config.rank_budget, PROBE_SATURATION * config.base_rank)
    assert fmap.rank_pattern == expected.ranks
    assert max(scores, key=scores.get) in fmap.rank_pattern
    by_score = sorted(fmap.rank_pattern, key=lambda n: -scores[n])
    ranks = [fmap.rank_pattern[n] for n in by_score]
    assert ranks == sorted(ranks, reverse=True)  # more score, never less rank
    assert len(set(ranks)) > 1
    step_params = max(2 * 2 * (m.in_features + m.out_features) for m in outcome.result.modules)
    assert abs(fmap.trainable_params - fmap.flat_equivalent_params) <= step_params


def test_probe_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="--probe-steps"):
        AnalysisConfig(dataset_dir=tmp_path, probe_steps=0)
    with pytest.raises(ConfigError, match="--probe-lr"):
        AnalysisConfig(dataset_dir=tmp_path, probe_lr=2.0)
    with pytest.raises(ConfigError, match="--probe-repeats"):
        AnalysisConfig(dataset_dir=tmp_path, probe_repeats=0)


def test_progress_counts_the_training_steps_then_the_attribution_passes(loaded, files):
    seen = []
    _probe(loaded, files, on_progress=lambda repeat, done, total: seen.append((repeat, done, total)))
    total = QUICK.steps + QUICK.points * QUICK.eval_samples
    assert seen[0] == (0, 0, total) and seen[-1] == (0, total, total)
    assert [d for _, d, _ in seen] == list(range(QUICK.steps)) + list(range(QUICK.steps + 1, total + 1))


def test_repeats_average_independent_probes_and_the_first_is_the_single_probe(loaded, files):
    seen = []
    averaged = _probe(loaded, files, 3, replace(QUICK, repeats=3),
                      on_progress=lambda repeat, done, total: seen.append((repeat, done)))
    single = _probe(loaded, files, 3)
    assert averaged.settings.repeats == 3 and averaged.lr_used == QUICK.lr
    # each repeat is a whole probe of its own (its training steps, then its attribution), one after another
    total = QUICK.steps + QUICK.points * QUICK.eval_samples
    assert [r for r, _ in seen] == [0] * total + [1] * total + [2] * total
    # the average of three different probes: not the first alone, and as complete as each of them
    assert averaged.share != single.share
    assert sum(averaged.share.values()) == pytest.approx(averaged.loss_before - averaged.loss_probed, rel=0.05)
    # the first is exactly the single probe of the same seed; the other two run on streams of their own
    runs = [_one_probe(loaded, files, mix_seed(3, probe_module._PROBE_STREAM, r)) for r in (1, 2)]
    expected = {n: (single.share[n] + runs[0].share[n] + runs[1].share[n]) / 3 for n in single.share}
    assert averaged.share == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert averaged.loss_before == pytest.approx((single.loss_before + runs[0].before + runs[1].before) / 3, rel=1e-12)
    assert runs[0].share != single.share and runs[0].share != runs[1].share


def test_a_repeat_that_raises_the_loss_is_averaged_in_not_refused(loaded, files):
    settings = replace(QUICK, steps=1, lr=0.3, repeats=6)  # one rough step: some of these probes fail on their own
    unlucky = _one_probe(loaded, files, mix_seed(3, probe_module._PROBE_STREAM, 5), settings, attribute_any_fall=True)
    assert unlucky.probed > unlucky.before  # the sixth probe alone raises the loss (the first alone lowers it)
    result = _probe(loaded, files, 3, settings)
    assert result.lr_used == 0.3  # no retry at a tenth for a later repeat: the first one learned at this rate
    assert result.loss_probed < result.loss_before  # the six together lower it
    # every probe counts in the average, the unlucky one with its shares of the rise
    runs = [_one_probe(loaded, files, mix_seed(3, probe_module._PROBE_STREAM), settings)]
    runs += [_one_probe(loaded, files, mix_seed(3, probe_module._PROBE_STREAM, r), settings, attribute_any_fall=True)
             for r in range(1, 6)]
    assert runs[5] == unlucky
    expected = {n: sum(run.share[n] for run in runs) / 6 for n in result.share}
    assert result.share == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _one_probe(loaded, files, stream, settings=QUICK, attribute_any_fall=False):
    spec = DatasetSpec.from_model_config(loaded.entry.config)
    samples = [load_sample(f, spec) for f in files]
    return probe_module._probe_once(loaded, targetable_modules(loaded.num_layers), samples.__getitem__, len(files),
                                    settings, stream, None, lambda _d, _t: None, attribute_any_fall)


def test_a_probe_that_learns_nothing_is_retried_at_a_tenth_of_the_lr_then_refused(loaded, files):
    seen = []
    with pytest.raises(ConfigError, match=r"--probe-lr 0\.01 nor at 0\.001.*--rank-signal data"):
        _probe(loaded, files, settings=replace(QUICK, steps=0), on_progress=lambda r, d, t: seen.append((d, t)))
    assert seen == []  # neither attempt had a step to train nor a fall to share out
    assert _probe(loaded, files).lr_used == QUICK.lr  # a probe that learns keeps its rate
