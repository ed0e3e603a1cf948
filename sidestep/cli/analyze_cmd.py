"""`sidestep analyze`: Preprocessing++ — measure which DiT modules react to a dataset and write fisher_map.json."""

from __future__ import annotations

import sys
from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
import typer
from rich.prompt import Confirm

from sidestep.cli.recipe import apply_recipe
from sidestep.display import output
from sidestep.display.analysis import print_preview
from sidestep.cli.options import (
    ConfigFileOpt,
    PresetOpt,
    AllowTurboOpt,
    AlphaRatioOpt,
    BaseVariantOpt,
    BatchesPerRunOpt,
    BudgetOpt,
    CheckpointDirOpt,
    ConvergencePatienceOpt,
    DatasetDirOpt,
    DeviceOpt,
    GradientCheckpointingOpt,
    JsonOpt,
    MapOutputOpt,
    ModelOpt,
    NoInitOpt,
    PrecisionOpt,
    RankMaxOpt,
    RankMinOpt,
    RankOpt,
    ProbeLrOpt,
    ProbeRepeatsOpt,
    ProbeStepsOpt,
    RankSignalOpt,
    RunsOpt,
    SeedOpt,
    SkipBadOpt,
    TimestepFocusOpt,
    WeightRankOpt,
    YesOpt,
)
from sidestep.analysis.fisher_map import concentration_summary, modules_at_rank_max
from sidestep.errors import ConfigError

__all__ = ["analyze", "summary_json"]


def analyze(
    ctx: typer.Context,
    dataset_dir: DatasetDirOpt = None,
    config_file: ConfigFileOpt = None,
    preset: PresetOpt = None,
    timestep_focus: TimestepFocusOpt = "balanced",
    rank: RankOpt = 64,
    rank_min: RankMinOpt = 16,
    rank_max: RankMaxOpt = None,
    convergence_patience: ConvergencePatienceOpt = 5,
    checkpoint_dir: CheckpointDirOpt = None,
    model: ModelOpt = None,
    base_variant: BaseVariantOpt = None,
    yes: YesOpt = False,
    seed: SeedOpt = 42,
    runs: RunsOpt = None,
    batches_per_run: BatchesPerRunOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    output_path: MapOutputOpt = None,
    json: JsonOpt = False,
    budget: BudgetOpt = "median",
    alpha_ratio: AlphaRatioOpt = 2.0,
    rank_signal: RankSignalOpt = "probe",
    probe_steps: ProbeStepsOpt = 40,
    probe_lr: ProbeLrOpt = 1e-2,
    probe_repeats: ProbeRepeatsOpt = 1,
    allow_turbo: AllowTurboOpt = False,
    gradient_checkpointing: GradientCheckpointingOpt = None,
    skip_bad: SkipBadOpt = False,
    weight_rank: WeightRankOpt = True,
    no_init: NoInitOpt = False,
) -> None:
    """Preprocessing++: find the modules that react to your data, give them adaptive ranks, write fisher_map.json."""
    from sidestep.analysis.config import AnalysisConfig  # imports torch: keep `sidestep --help` fast
    from sidestep.analysis.fisher_map import LR_ADVICE
    from sidestep.analysis.run import analyze_dataset, check_output
    from sidestep.data.dataset import sample_files
    from sidestep.models.select import choose_model, choose_runtime

    recipe = None
    if config_file is not None or preset is not None:  # a recipe fills what the command line left at its default
        recipe = apply_recipe(ctx, config_file, preset)
        v = recipe.values
        (dataset_dir, timestep_focus, rank, rank_min, rank_max, convergence_patience, checkpoint_dir, model,
         base_variant, yes, seed, runs, batches_per_run, device, precision, output_path, budget, alpha_ratio,
         rank_signal, allow_turbo, gradient_checkpointing, skip_bad, weight_rank, no_init, probe_steps, probe_lr,
         probe_repeats) = (
            v[k] for k in ("dataset_dir", "timestep_focus", "rank", "rank_min", "rank_max", "convergence_patience",
                           "checkpoint_dir", "model", "base_variant", "yes", "seed", "runs", "batches_per_run",
                           "device", "precision", "output_path", "budget", "alpha_ratio", "rank_signal",
                           "allow_turbo", "gradient_checkpointing", "skip_bad", "weight_rank", "no_init",
                           "probe_steps", "probe_lr", "probe_repeats"))

    if dataset_dir is None:
        raise ConfigError("--dataset-dir is required: the folder of preprocessed .pt files to analyse.")
    config = AnalysisConfig(
        dataset_dir=dataset_dir, output=output_path, timestep_focus=timestep_focus, base_rank=rank,
        rank_min=rank_min, rank_max=rank_max, budget=budget, alpha_ratio=alpha_ratio, rank_signal=rank_signal,
        runs=runs, batches_per_run=batches_per_run, convergence_patience=convergence_patience, seed=seed,
        weight_rank=weight_rank, allow_turbo=allow_turbo, skip_bad=skip_bad, write_init=not no_init,
        probe_steps=probe_steps, probe_lr=probe_lr, probe_repeats=probe_repeats,
    )
    sample_files(config.dataset_dir)  # a missing or empty folder is the first thing to hear about
    check_output(config.output_path)  # and a map that could not be written, before any model loads
    if not yes and not sys.stdin.isatty():
        raise ConfigError("Cannot ask whether to save fisher_map.json because stdin is not a terminal; pass --yes.")
    choice = choose_model(checkpoint_dir, model, base_variant)
    runtime = choose_runtime(device, precision, gradient_checkpointing)
    if recipe is not None:
        recipe.show()
    output.info(f"Model {choice.entry.label}; {runtime.reason}.")
    bar = _ProgressBar()
    try:
        outcome = analyze_dataset(config, choice, runtime, on_progress=bar.update,
                                  confirm=_confirm(yes, before=bar.stop), on_warning=output.warn)
    finally:
        bar.stop()
    if outcome.saved:
        output.success(f"Saved {outcome.path}" + (f" (previous map kept as {outcome.backup.name})" if outcome.backup else ""))
        if outcome.report_png is not None:
            output.info(f"Heatmap: {outcome.report_png}")
        if outcome.init_path is not None:
            output.info(f"Init bases: {outcome.init_path} (use with `sidestep train --init gradient`)")
        output.info(f"`sidestep train --dataset-dir {config.dataset_dir}` will use it. {LR_ADVICE}")
    else:
        output.info("Not saved; nothing was written.")
    if json:
        output.emit_json(summary_json(outcome))


class _ProgressBar:
    """The engine's progress callback drawn as a rich bar on stderr; `stop()` before prompting."""

    def __init__(self) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[rho]}"))
        self._bar = Progress(*columns, console=output.console, transient=True)
        self._task = self._bar.add_task("Loading model", total=None, rho="")
        self._bar.start()

    def update(self, p: Any) -> None:
        if p.phase == "fisher":
            rho = "" if p.spearman is None else f"stability ρ {p.spearman:.3f}" + (" ✓" if p.converged else "")
            self._bar.update(self._task, description=f"Fisher run {p.run}/{p.runs}", completed=p.done,
                             total=p.total, rho=rho)
        elif p.phase == "weight-rank":
            self._bar.update(self._task, description="Weight SVDs", rho="")
        elif p.phase in ("probe", "probe-attribution"):
            label = ("LoRA probe" if p.phase == "probe" else "Probe attribution") + (
                f" {p.run}/{p.runs}" if p.runs > 1 else "")
            self._bar.update(self._task, description=label, completed=p.done, total=p.total, rho="")

    def stop(self) -> None:
        self._bar.stop()


def _confirm(yes: bool, before: Callable[[], None]) -> Callable[[Any], bool]:
    def ask(fmap: Any) -> bool:
        from sidestep.analysis.report import build_preview

        before()
        print_preview(build_preview(fmap))
        if yes:
            return True
        # Yes by default, as in the wizard: a map already there is kept as fisher_map.json.bak
        return Confirm.ask("Save fisher_map.json?", default=True, console=output.console)

    return ask


def summary_json(outcome) -> dict[str, Any]:
    """The machine-readable summary printed by --json."""
    from sidestep.analysis.report import build_preview

    fmap = outcome.map
    ranks = sorted(fmap.rank_pattern.values())
    demand = concentration_summary(fmap)
    preview = build_preview(fmap)
    return {
        "saved": outcome.saved,
        "path": str(outcome.path) if outcome.path else None,
        "backup": str(outcome.backup) if outcome.backup else None,
        "report": str(outcome.report_png) if outcome.report_png else None,
        "init": str(outcome.init_path) if outcome.init_path else None,
        "model_variant": fmap.model_variant,
        "timestep_focus": fmap.timestep_focus,
        "adapted_modules": len(fmap.rank_pattern),
        "excluded_modules": len(fmap.excluded_modules),
        "ranks": {"min": ranks[0] if ranks else None, "max": ranks[-1] if ranks else None, "base": fmap.base_rank},
        "modules_at_rank_max": modules_at_rank_max(fmap),
        "trainable_params": fmap.trainable_params,
        "flat_equivalent_params": fmap.flat_equivalent_params,
        "num_runs": fmap.num_runs,
        "total_batches": fmap.total_batches,
        "cross_run_spearman": fmap.convergence.cross_run_spearman if fmap.convergence else None,
        "low_confidence_modules": list(fmap.low_confidence_modules),
        "concentration_measure": demand.measure if demand else None,
        "top10_share": demand.top10_share if demand else None,
        "spread_evenly": demand.spread_evenly if demand else None,
        "probe_loss_fall": demand.loss_fall if demand else None,
        "top_modules_by": preview.ranked_by,  # what the top modules are ranked by: what set the ranks
        "top_modules": [{"name": m.name, "share": m.share, "fisher_score": m.fisher, "rank": m.rank} for m in preview.top],
        "warnings": list(outcome.warnings),
        "skipped": list(outcome.skipped),
        "seconds": round(outcome.result.seconds, 3),
    }
