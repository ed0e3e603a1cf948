"""Preprocessing++ in the wizard: preset → model → dataset → focus → budget → ranks → confirm → run → result.

The answers build the same `AnalysisConfig` as `sidestep analyze`, validated by the same code, and the run
is the same library call; nothing here has its own defaults.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.table import Table

from sidestep.analysis.allocate import BudgetMode
from sidestep.analysis.config import AnalysisConfig, default_rank_max
from sidestep.errors import SidestepError
from sidestep.objective import Focus, parse_focus
from sidestep.wizard.asker import Asker, Back, Option
from sidestep.wizard.common import Answers, Session, ask_dataset, ask_model, ask_preset, seconds_text
from sidestep.wizard.fields import problem_of
from sidestep.wizard.steps import Step, default_of, run_steps

__all__ = ["analysis_flow", "build_config", "summary_table", "PRESET_FIELDS_USED"]

CUSTOM = "custom"
FOCUS_OPTIONS = [
    Option("balanced", Focus.BALANCED.value, "the model's own mix of noise levels; recommended for most uses"),
    Option("texture", Focus.TEXTURE.value, "little noise (t 0–0.4): timbre and sound design, style transfer"),
    Option("structure", Focus.STRUCTURE.value, "much noise (t 0.6–1): rhythm, beat grid, composition"),
    Option("custom", CUSTOM, "your own LOW,HIGH range of t inside [0, 1]"),
]
BUDGET_OPTIONS = [
    Option("median", BudgetMode.MEDIAN.value, "Side-Step's rule: the median adapted module gets the base rank, "
                                              "about half the modules are adapted"),
    Option("flat", BudgetMode.FLAT.value, "the parameters of a flat LoRA at the base rank, spent where the probe "
                                          "finds need; the best map on our planted benchmark (largest rank at "
                                          "least 4 × the base rank)"),
]
# Preset field -> AnalysisConfig field (a preset's `rank` is the analysis' base rank).
PRESET_FIELDS_USED = {"rank": "base_rank", "rank_min": "rank_min", "rank_max": "rank_max"}


def analysis_flow(asker: Asker, session: Session, start: dict[str, Any] | None = None) -> None:
    """Ask, confirm, run Preprocessing++, then offer to train with the new map. `start` pre-fills answers."""
    answers: dict[str, Any] = dict(start or {})
    run_steps(asker, _steps(), answers)
    if not answers["go"]:
        asker.say("Nothing was written; back to the main menu.")
        return
    config = build_config(answers)
    session.last_choices = {preset_key: getattr(config, field) for preset_key, field in PRESET_FIELDS_USED.items()}
    session.last_flow = "Preprocessing++"
    outcome = _run(asker, config, answers)
    if outcome is None:
        return
    if asker.confirm("Train now with this map?", default=True):
        from sidestep.wizard.train_flow import train_flow

        train_flow(asker, session, start={"model": answers["model"], "dataset_dir": config.dataset_dir,
                                          "carried_preset": answers.get("preset", "")})


def _steps() -> list[Step]:
    return [
        Step("preset", lambda a, ans: ask_preset(a, ans, PRESET_FIELDS_USED)),
        Step("model", ask_model),
        Step("dataset_dir", ask_dataset),
        Step("focus", _ask_focus),
        Step("custom_focus", _ask_custom_focus, when=lambda ans: ans.get("focus") == CUSTOM),
        Step("budget", _ask_budget),
        Step("base_rank", _rank_question("base_rank", "Base rank (the median rank, or the flat LoRA's rank)")),
        Step("rank_min", _rank_question("rank_min", "Smallest rank any module may get")),
        Step("rank_max", _rank_question("rank_max", "Largest rank any module may get")),
        Step("go", _confirm),
    ]


def build_config(answers: Answers) -> AnalysisConfig:
    """The answers as an `AnalysisConfig` (raises ConfigError exactly like the CLI does)."""
    focus = answers.get("custom_focus") if answers.get("focus") == CUSTOM else answers.get("focus")
    chosen = {key: answers[key] for key in ("base_rank", "rank_min", "rank_max", "budget") if key in answers}
    allow_turbo = bool(answers.get("allow_turbo"))
    return AnalysisConfig(dataset_dir=answers["dataset_dir"], timestep_focus=focus or "balanced",
                          allow_turbo=allow_turbo, **chosen)


# ---- questions -------------------------------------------------------------------------------------------------


def _ask_focus(asker: Asker, answers: Answers) -> str:
    default = answers.get("focus", default_of(AnalysisConfig, "timestep_focus"))
    return asker.choice("Timestep focus (how the analysis listens)", FOCUS_OPTIONS, default=default)


def _ask_budget(asker: Asker, answers: Answers) -> str:
    default = answers.get("budget", BudgetMode(default_of(AnalysisConfig, "budget")).value)
    return asker.choice("Rank budget (how the map spends its ranks)", BUDGET_OPTIONS, default=default)


def _ask_custom_focus(asker: Asker, answers: Answers) -> str:
    def check(text: str) -> str | None:
        return problem_of(lambda: parse_focus(text))

    text = asker.text("Custom range LOW,HIGH of t in [0, 1] (e.g. 0.2,0.7)", default=answers.get("custom_focus", ""),
                      validate=check)
    return parse_focus(text)[0]


def _rank_question(key: str, message: str):
    preset_key = next(k for k, v in PRESET_FIELDS_USED.items() if v == key)

    def ask(asker: Asker, answers: Answers) -> int:
        default = answers.get(key, answers.get("preset_values", {}).get(preset_key, _config_default(key, answers)))

        def check(value: int) -> str | None:
            # Judged by the very config the CLI builds; bounds not asked yet are set so only this answer counts.
            trial = {**answers, key: value}
            if key == "base_rank":
                trial.update(rank_min=1, rank_max=value)
            elif key == "rank_min":
                trial["rank_max"] = trial["base_rank"]
            return problem_of(lambda: build_config(trial))

        lo, hi = 1, 4096
        if key == "rank_min":
            hi = answers["base_rank"]
        elif key == "rank_max":
            lo = answers["base_rank"]
        return asker.integer(message, default=default, lo=lo, hi=hi, validate=check)

    return ask


def _config_default(key: str, answers: Answers) -> Any:
    """The config's own default for `key`; --rank-max's depends on the budget and base rank already answered."""
    if key == "rank_max":
        return default_rank_max(answers.get("budget", default_of(AnalysisConfig, "budget")), answers.get("base_rank"))
    return default_of(AnalysisConfig, key)


def _confirm(asker: Asker, answers: Answers) -> bool:
    from sidestep.analysis.run import preflight

    choice = answers["model"]
    answers["allow_turbo"] = False
    config = build_config(answers)
    turbo = choice.entry.is_turbo  # the same rule as `sidestep analyze`
    # The library's own preflight: the same checks and warnings (small dataset, turbo) as `sidestep analyze`.
    _scan, warnings = preflight(replace(config, allow_turbo=turbo), choice.entry)
    answers["warnings_shown"] = set(warnings)
    asker.say(summary_table(config, choice, answers["scan"]))
    for message in warnings:
        asker.say(f"[bold yellow]Warning:[/] {message}")
    if turbo:
        if not asker.confirm("This is a turbo model. Analyse it anyway?", default=False):
            return False
        answers["allow_turbo"] = True
    target = config.output_path
    extra = " (the current one is kept as fisher_map.json.bak)" if target.exists() else ""
    return asker.confirm(f"Run Preprocessing++ now? It writes {target}{extra}.", default=True)


def _warn_once(asker: Asker, message: str, shown: set[str]) -> None:
    if message not in shown:
        shown.add(message)
        asker.say(f"[yellow]Warning:[/] {message}")


def summary_table(config: AnalysisConfig, choice: Any, scan: Any) -> Table:
    """The confirmation summary: model, dataset size, focus, rank budget, estimated time."""
    samples = len(scan.files)
    runs, batches = config.runs_for(samples), config.batches_for(samples)
    minutes = scan.total_frames / 25 / 60
    table = Table(title="Preprocessing++ — about to run", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("Model", choice.entry.label)
    table.add_row("Dataset", f"{config.dataset_dir} — {samples} samples, {minutes:.1f} min of audio")
    low, high = config.focus_range
    table.add_row("Timestep focus", f"{config.focus_label} (t in {low:g}–{high:g})")
    if config.budget is BudgetMode.FLAT:
        budget = f"flat: the parameters of a rank-{config.base_rank} LoRA on every target"
    else:
        budget = f"median {config.base_rank}"
    table.add_row("Rank budget", f"{budget}, range {config.rank_min}–{config.rank_max}, "
                                 f"alpha = {config.alpha_ratio:g} × rank")
    table.add_row("Work", f"{runs} runs × up to {batches} batches (one forward+backward each)")
    table.add_row("Estimated time", _estimate(config, choice, scan, runs * batches))
    table.add_row("Writes", str(config.output_path))
    return table


def _estimate(config: AnalysisConfig, choice: Any, scan: Any, total_batches: int) -> str:
    """A rough figure from model size × sequence length and the device kind; honest about being rough."""
    from sidestep.models.select import choose_runtime

    cfg = choice.entry.config
    hidden = int(cfg.get("hidden_size", 2048))
    layers = int(cfg.get("num_hidden_layers", 24))
    inter = int(cfg.get("intermediate_size", 3 * hidden))
    params = layers * (8 * hidden * hidden + 3 * hidden * inter)
    tokens = max(1.0, scan.total_frames / max(1, len(scan.files)) / int(cfg.get("patch_size", 2)))
    try:
        device = choose_runtime(None, None).device.type
    except SidestepError:
        device = "cpu"
    flops_per_second = {"cuda": 8e13, "mps": 5e12}.get(device, 3e11)
    seconds = total_batches * 8 * params * tokens / flops_per_second + 10  # +10 s to load the model
    return f"{seconds_text(seconds)} on {device} (rough; stops early once the ranking is stable)"


def _run(asker: Asker, config: AnalysisConfig, answers: Answers) -> Any:
    """The same library call as `sidestep analyze`, with a progress bar; returns the outcome if saved."""
    from sidestep.analysis.run import analyze_dataset
    from sidestep.models.select import choose_runtime

    runtime = choose_runtime(None, None)
    asker.say(f"[dim]Device: {runtime.device} ({runtime.reason})[/]")

    with asker.progress("Preprocessing++") as bar:
        def on_progress(p: Any) -> None:
            if p.phase.startswith("probe"):  # the LoRA probe: its steps, then its attribution passes
                label = "LoRA probe" if p.phase == "probe" else "probe attribution"
                bar(p.done, p.total, label + (f" {p.run}/{p.runs}" if p.runs > 1 else ""))
                return
            rho = f", ρ {p.spearman:.3f}" if p.spearman is not None else ""
            bar(p.done, p.total, f"run {p.run}/{p.runs} {p.phase}{rho}")

        def confirm(fmap: Any) -> bool:
            from sidestep.analysis.report import build_preview
            from sidestep.display.analysis import print_preview  # the one preview, shared with `sidestep analyze`

            bar.stop()  # close the live bar before drawing the preview and the prompt
            print_preview(build_preview(fmap))
            try:
                return asker.confirm(f"Save {config.output_path.name}?", default=True)
            except Back:
                return False

        outcome = analyze_dataset(config, answers["model"], runtime, on_progress=on_progress, confirm=confirm,
                                  on_warning=lambda m: _warn_once(asker, m, answers["warnings_shown"]))
    if not outcome.saved:
        asker.say("Not saved; nothing was written.")
        return None
    asker.say(result_summary(outcome))
    return outcome


def result_summary(outcome: Any) -> str:
    """After saving: where the map went, what it adapts, what it costs, how settled it was."""
    fmap = outcome.map
    ranks = sorted(fmap.rank_pattern.values())
    median = ranks[len(ranks) // 2] if ranks else 0
    lines = [f"[green]✓ Saved {outcome.path}[/]"]
    if outcome.backup:
        lines.append(f"  previous map kept as {outcome.backup}")
    if outcome.report_png:
        lines.append(f"  heatmap: {outcome.report_png}")
    total = len(ranks) + len(fmap.excluded_modules)
    lines.append(f"  {len(ranks)} of {total} modules adapted, ranks {ranks[0] if ranks else 0}–"
                 f"{ranks[-1] if ranks else 0} (median {median})")
    if fmap.trainable_params and fmap.flat_equivalent_params:
        ratio = fmap.trainable_params / fmap.flat_equivalent_params
        lines.append(f"  {fmap.trainable_params:,} trainable parameters ({ratio:.0%} of a flat rank-"
                     f"{fmap.base_rank} LoRA: {fmap.flat_equivalent_params:,})")
    if fmap.convergence and fmap.convergence.cross_run_spearman is not None:
        lines.append(f"  agreement between runs: Spearman {fmap.convergence.cross_run_spearman:.3f} "
                     f"over {fmap.total_batches} batches")
    from sidestep.analysis.fisher_map import LR_ADVICE

    lines.append(f"  [dim]{LR_ADVICE}[/]")
    return "\n".join(lines)
