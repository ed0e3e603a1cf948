"""`analyze_dataset`: the one library entry behind `sidestep analyze` and the wizard.

Preflight (dataset, output folder, turbo opt-in) → load the model → Fisher engine → select and allocate →
FisherMap → `confirm(map)` → PNG rendered, init bases written (fisher_init.safetensors, unless write_init is off),
map written atomically (old files kept as .bak), PNG written.
Nothing is written when anything fails or the user stops; every problem is one SidestepError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from sidestep.analysis.allocate import (
    Allocation,
    BudgetMode,
    allocate_ranks,
    concentration,
    saturating_ranks,
    select_modules,
    size_signal,
    water_fill_ranks,
)
from sidestep.analysis.config import AnalysisConfig, RankSignal
from sidestep.analysis.engine import AnalysisResult, Progress, run_analysis
from sidestep.analysis.fisher_map import (
    NEED_FIELD,
    PROBE_FIELD,
    TURBO_MAP_ADVICE,
    ADVISED_LR,
    Convergence,
    FisherMap,
    ModuleEntry,
    RunConvergence,
    SampleCoverage,
    TimestepParams,
    ToolInfo,
    write_map,
)
from sidestep.analysis.init_file import init_bases, init_path_for, write_init
from sidestep.analysis.modules import check_rank_max_fits, module_shapes, targetable_modules
from sidestep.analysis.probe import ProbeResult, ProbeSettings, measure_probe
from sidestep.analysis.signals import NeedEstimate, low_confidence
from sidestep.data import DatasetScan, DatasetSpec, content_hash, dataset_hash, scan_dataset
from sidestep.errors import ConfigError, Interrupted, SidestepError
from sidestep.fileio import write_bytes_atomic
from sidestep.models import LoadedModel, ModelEntry, Runtime, load_model
from sidestep.models.select import ModelChoice

__all__ = ["AnalysisOutcome", "analyze_dataset", "build_map", "check_output", "preflight"]

SMALL_DATASET = 5
# Below this share of the total need in the top 10% of modules the need counts as spread evenly (uniform: 0.10).
SPREAD_EVENLY_BELOW = 0.25
# A probe map under --budget flat: a module's gain falls e-fold every PROBE_SATURATION · --rank ranks. Twice the
# flat rank recovered the most of the oracle's gain on bench/planted.py (docs/data-awareness.md, "Sizing").
PROBE_SATURATION = 2.0


@dataclass(frozen=True)
class AnalysisOutcome:
    """What one analysis produced; `path` is None when the user declined to save."""

    map: FisherMap
    result: AnalysisResult
    allocation: Allocation
    path: Path | None
    backup: Path | None
    report_png: Path | None
    warnings: tuple[str, ...]
    skipped: tuple[str, ...]  # unreadable samples left out with skip_bad
    init_path: Path | None = None  # fisher_init.safetensors when written

    @property
    def saved(self) -> bool:
        return self.path is not None


def preflight(config: AnalysisConfig, entry: ModelEntry) -> tuple[DatasetScan, list[str]]:
    """Everything checkable before the model loads; returns the usable files and the warnings to show."""
    warnings: list[str] = []
    if entry.is_turbo:
        if not config.allow_turbo:
            raise ConfigError(
                f"{entry.name} is a turbo model, which Preprocessing++ can destabilise; pass --allow-turbo to "
                f"analyse it anyway (then train with a lower learning rate such as {ADVISED_LR} and check samples early), "
                f"or analyse a base model."
            )
        warnings.append(f"{entry.name} is a turbo model. {TURBO_MAP_ADVICE}")
    check_output(config.output_path)
    scan = scan_dataset(config.dataset_dir, DatasetSpec.from_model_config(entry.config), config.skip_bad)
    warnings.extend(f"Skipped {problem}" for problem in scan.problems)
    if len(scan.files) < SMALL_DATASET:
        warnings.append(f"Only {len(scan.files)} sample(s) in {config.dataset_dir}: module rankings may be "
                        f"unreliable; {SMALL_DATASET} or more samples give a steadier map.")
    return scan, warnings


def analyze_dataset(
    config: AnalysisConfig,
    model: ModelChoice | ModelEntry,
    runtime: Runtime,
    on_progress: Callable[[Progress], None] | None = None,
    confirm: Callable[[FisherMap], bool] | None = None,
    on_warning: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    loader: Callable[[ModelEntry, Runtime], LoadedModel] = load_model,
) -> AnalysisOutcome:
    """Analyse `config.dataset_dir` on the chosen model and write fisher_map.json (+ PNG) if `confirm` agrees.

    Args:
        confirm: shown the finished map; return False to write nothing. None saves without asking.
        on_warning: receives each warning as soon as it is known (they are also in the outcome).
        should_stop: polled before every batch; True stops with `Interrupted` and nothing written.
        loader: how the model is loaded (tests reuse one loaded model).
    """
    entry = model.entry if isinstance(model, ModelChoice) else model
    scan, warnings = preflight(config, entry)
    for message in warnings:
        if on_warning is not None:
            on_warning(message)
    try:
        loaded = loader(entry, runtime)
        check_rank_max_fits(config.rank_budget.hi, module_shapes(loaded.transformer))
        result = run_analysis(config, loaded, scan.files, on_progress, should_stop)
        if config.rank_signal is RankSignal.PROBE:
            result = with_probe(config, loaded, result, scan, should_stop, on_progress)
    except KeyboardInterrupt:
        raise Interrupted("Analysis interrupted; nothing was written.") from None
    fmap, allocation = build_map(config, loaded, result, scan)
    fmap = replace(fmap, created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    outcome = AnalysisOutcome(fmap, result, allocation, None, None, None, tuple(warnings), scan.problems)
    if not _is_main_process():  # under torchrun the others measured their share; process 0 asks and writes
        return outcome
    if confirm is not None and not confirm(fmap):
        return outcome
    return _save(config, outcome, on_warning)


def build_map(config: AnalysisConfig, loaded: LoadedModel, result: AnalysisResult,
              scan: DatasetScan) -> tuple[FisherMap, Allocation]:
    """Select modules, allocate ranks and assemble the map (no file is touched)."""
    stats = result.by_name
    fisher = {m.name: m.fisher for m in result.modules}
    shapes = {m.name: m.shape for m in result.modules}
    budget = config.rank_budget
    allocation = _allocate(config, result, shapes)
    entries = tuple(
        ModuleEntry(name=n, fisher_score=stats[n].fisher, fisher_cross_run_std=stats[n].fisher_std,
                    effective_rank=stats[n].weight_rank, assigned_rank=rank, data_rank=stats[n].data_rank)
        for n, rank in allocation.ranks.items()
    )
    variant = loaded.variant
    fmap = FisherMap(
        rank_pattern=dict(allocation.ranks),
        alpha_pattern=dict(allocation.alphas),
        modules=entries,
        excluded_modules=tuple(n for n in targetable_modules(loaded.num_layers) if n not in allocation.ranks),
        model_variant=variant.name,
        timestep_focus=config.focus_label,
        timestep_range=config.focus_range,
        timestep_params=TimestepParams(variant.timestep_mu, variant.timestep_sigma, variant.data_proportion),
        num_runs=len(result.runs),
        batches_per_run=config.batches_for(len(scan.files)),
        total_batches=result.total_batches,
        base_rank=config.base_rank,
        rank_min=config.rank_min,
        rank_max=config.rank_max,
        dataset_hash=dataset_hash(config.dataset_dir),
        sample_coverage=tuple(
            SampleCoverage(r.run, len(r.files), r.total_count, round(len(r.files) / r.total_count, 6), r.files)
            for r in result.runs
        ),
        num_hidden_layers=loaded.num_layers,
        tool=ToolInfo(),
        seed=config.seed,
        rank_signal=config.rank_signal.value,
        budget_mode=budget.mode.value,
        rank_step=budget.effective_step,
        alpha_ratio=float(config.alpha_ratio),
        trainable_params=allocation.trainable_params,
        flat_equivalent_params=allocation.flat_equivalent_params,
        convergence=Convergence(
            tuple(RunConvergence(r.run, r.batches, r.final_spearman, r.converged) for r in result.runs),
            result.cross_run_spearman,
        ),
        low_confidence_modules=tuple(low_confidence(fisher, {m.name: m.fisher_std for m in result.modules})),
        content_hash=content_hash(scan.files),
        extra=_need_field(result) | _probe_field(result),
    )
    return fmap, allocation


def with_probe(config: AnalysisConfig, loaded: LoadedModel, result: AnalysisResult, scan: DatasetScan,
               should_stop: Callable[[], bool] | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> AnalysisResult:
    """The result with the probe's per-module scores (`--rank-signal probe`), measured on the same dataset.

    Progress: phase "probe" over the training steps, then "probe-attribution" over the attribution passes; `done`
    of `total` counts both, for each of the `--probe-repeats` probes in turn (`run` of `runs`).
    """
    def report(repeat: int, done: int, total: int) -> None:
        phase = "probe" if done <= config.probe_steps else "probe-attribution"
        on_progress(Progress(phase, repeat + 1, config.probe_repeats, done, total, done, total))

    announce = report if on_progress is not None and _is_main_process() else None
    settings = ProbeSettings(steps=config.probe_steps, rank=config.probe_rank, lr=config.probe_lr,
                             scale=float(config.alpha_ratio), repeats=config.probe_repeats)
    spec = DatasetSpec.from_model_config(loaded.entry.config)
    probe = measure_probe(loaded, [m.name for m in result.modules], list(scan.files), spec, settings, config.seed,
                          should_stop, announce)
    return replace(result, probe=probe, seconds=result.seconds + probe.seconds)  # the analysis's time is both


def signal_scores(kind: RankSignal, result: AnalysisResult) -> dict[str, float]:
    """Every module's score under `kind`, higher = more adapter (what selection and sizing rank by)."""
    stats = result.by_name
    if kind is RankSignal.NEED:
        return _need_per_parameter(result)
    if kind is RankSignal.PROBE:
        return dict(_probe_of(result).scores)
    fisher = {n: s.fisher for n, s in stats.items()}
    return size_signal(fisher, _second_signal(kind, result, list(stats)))


def _allocate(config: AnalysisConfig, result: AnalysisResult, shapes: dict) -> Allocation:
    budget = config.rank_budget
    if config.rank_signal is RankSignal.NEED:
        if budget.mode is BudgetMode.FLAT:
            return water_fill_ranks({n: _need_of(result, n).spectrum for n in shapes}, shapes, budget)
        scores = _need_per_parameter(result)
        selected = select_modules(scores, config.inclusion, config.category_floor)
        return allocate_ranks({n: scores[n] for n in selected}, {n: shapes[n] for n in selected}, budget, shapes)
    if config.rank_signal is RankSignal.PROBE:
        if budget.mode is BudgetMode.FLAT:
            return saturating_ranks(_probe_of(result).share, shapes, budget, PROBE_SATURATION * budget.base)
        scores = _probe_of(result).scores
        selected = select_modules(scores, config.inclusion, config.category_floor)
        return allocate_ranks({n: scores[n] for n in selected}, {n: shapes[n] for n in selected}, budget, shapes)
    fisher = {m.name: m.fisher for m in result.modules}
    selected = select_modules(fisher, config.inclusion, config.category_floor)
    signal = size_signal({n: fisher[n] for n in selected}, _second_signal(config.rank_signal, result, selected))
    return allocate_ranks(signal, {n: shapes[n] for n in selected}, budget, shapes)


def _need_of(result: AnalysisResult, name: str) -> NeedEstimate:
    need = result.by_name[name].need
    if need is None:
        raise ConfigError("--rank-signal need needs the gradient sketches; the analysis ran without them.")
    return need


def _probe_of(result: AnalysisResult) -> ProbeResult:
    if result.probe is None:
        raise ConfigError("--rank-signal probe needs the probe run; this analysis result has none.")
    return result.probe


def _probe_field(result: AnalysisResult) -> dict:
    """The map's optional `probe` field: the settings and each module's share and score (docs/fisher-map.md)."""
    probe = result.probe
    if probe is None:
        return {}
    s = probe.settings
    share = concentration(probe.scores)
    return {PROBE_FIELD: {
        "steps": s.steps, "rank": s.rank, "lr": s.lr, "lr_used": probe.lr_used,  # no time: same seed, same map
        "repeats": s.repeats,
        "attribution": "path", "points": s.points,
        "loss_before": probe.loss_before, "loss_probed": probe.loss_probed,
        "top10_share": round(share, 6), "spread_evenly": share < SPREAD_EVENLY_BELOW,
        "per_module": {n: {"loss_share": probe.share[n], "score": probe.scores[n]} for n in probe.scores},
    }}


def _need_per_parameter(result: AnalysisResult) -> dict[str, float]:
    """Unbiased need per LoRA parameter of rank 1, ||E G||² / (in + out), noise (negative) as 0."""
    return {m.name: max(_need_of(result, m.name).total, 0.0) / (m.in_features + m.out_features)
            for m in result.modules}


def _need_field(result: AnalysisResult) -> dict:
    """The map's optional `need` field: per-module unbiased need and how concentrated it is (docs/fisher-map.md)."""
    if any(m.need is None for m in result.modules):
        return {}
    per_param = _need_per_parameter(result)
    share = concentration(per_param)
    return {NEED_FIELD: {
        "top10_share": round(share, 6),
        "spread_evenly": share < SPREAD_EVENLY_BELOW,
        "per_module": {m.name: {"need": m.need.total, "noise": m.need.noise, "need_per_param": per_param[m.name]}
                       for m in result.modules},
    }}


# ---- helpers ---------------------------------------------------------------------------------------


def _is_main_process() -> bool:
    from sidestep.distributed import current

    return current().is_main


def check_output(path: Path) -> None:
    """The map's --output: a writable file path, not a folder, not named like a sample."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; give a file path such as {path / 'fisher_map.json'}.")
    if path.suffix.lower() in (".pt", ".safetensors"):
        raise ConfigError(f"--output {path}: a map named like a sample file would be read as one; use a .json name.")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"--output {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {path}: the folder {folder} is not writable.")


def _second_signal(kind: RankSignal, result: AnalysisResult, names: list[str]) -> dict[str, float] | None:
    stats = result.by_name
    if kind in (RankSignal.FISHER, RankSignal.NEED):
        return None
    if kind is RankSignal.DATA:
        return {n: float(stats[n].data_rank) for n in names}
    if kind is RankSignal.GRAD_ENERGY:
        return {n: stats[n].grad_energy for n in names}
    missing = [n for n in names if stats[n].weight_rank is None]
    if missing:
        raise ConfigError("--rank-signal weight needs the weight effective rank; do not turn off --weight-rank.")
    return {n: float(stats[n].weight_rank) for n in names}


def _save(config: AnalysisConfig, outcome: AnalysisOutcome,
          on_warning: Callable[[str], None] | None) -> AnalysisOutcome:
    """Render the PNG in memory, write the map, then the PNG; a PNG failure only costs the picture."""
    from sidestep.analysis.report import render_png  # matplotlib: imported only when saving

    path = config.output_path
    png_path = path.with_suffix(".png")  # fisher_map.json -> fisher_map.png
    warnings = list(outcome.warnings)
    try:
        png = render_png(outcome.map, outcome.result)
    except Exception as err:  # noqa: BLE001 - the picture is optional: no plotting failure may cost the map
        png = None
        warnings.append(f"The heatmap could not be drawn ({err}); the map is saved without it.")
        if on_warning is not None:
            on_warning(warnings[-1])
    fmap = replace(outcome.map, report=png_path.name if png is not None else None)
    fmap, init_path = _save_init(config, fmap, outcome.result, path, warnings, on_warning)
    try:
        backup = write_map(fmap, path)
    except OSError as err:
        raise SidestepError(f"Cannot write {path} ({err.strerror or err}); nothing was changed there.") from err
    if png is not None:
        try:
            write_bytes_atomic(png_path, png)
        except OSError as err:
            png = None
            warnings.append(f"The heatmap {png_path} could not be written ({err.strerror or err}).")
            if on_warning is not None:
                on_warning(warnings[-1])
    return replace(outcome, map=fmap, path=path, backup=backup, report_png=png_path if png is not None else None,
                   warnings=tuple(warnings), init_path=init_path)


def _save_init(config: AnalysisConfig, fmap: FisherMap, result: AnalysisResult, map_path: Path,
               warnings: list[str], on_warning: Callable[[str], None] | None) -> tuple[FisherMap, Path | None]:
    """Write the gradient-init bases before the map that references them; a failure only costs `--init gradient`."""
    if not config.write_init or not result.sketches:
        return replace(fmap, init=None), None
    path = init_path_for(map_path)
    try:
        ref, _ = write_init(path, init_bases(result.sketches), result.sketch_k, config.seed)
    except (OSError, SidestepError) as err:
        warnings.append(f"The init file {path} could not be written ({getattr(err, 'strerror', None) or err}); the "
                        "map is saved without it, so `sidestep train --init gradient` will use the default init.")
        if on_warning is not None:
            on_warning(warnings[-1])
        return replace(fmap, init=None), None
    return replace(fmap, init=ref), path
