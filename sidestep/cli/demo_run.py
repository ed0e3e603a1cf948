"""The steps `sidestep demo` runs after setup; each later feature adds its step here."""

from __future__ import annotations

from sidestep.display import output
from sidestep.models import find_model, resolve_runtime
from sidestep.testing.demo import DEMO_MODEL, DemoPaths


def run_demo_job(paths: DemoPaths) -> None:
    _preprocess_step(paths)
    _analyze_step(paths)
    _train_step(paths)
    _generate_step(paths)


def _analyze_step(paths: DemoPaths) -> None:
    """Step 2: Preprocessing++ on the demo dataset, saved without asking (`sidestep analyze --yes`)."""
    from sidestep.analysis.config import AnalysisConfig
    from sidestep.analysis.report import build_preview
    from sidestep.analysis.run import analyze_dataset
    from sidestep.display.analysis import print_preview

    entry = find_model(paths.checkpoints, DEMO_MODEL)
    # A rank budget in proportion to the demo's hidden size of 64.
    config = AnalysisConfig(dataset_dir=paths.dataset, base_rank=8, rank_min=4, rank_max=16)

    def show_and_save(fmap) -> bool:
        print_preview(build_preview(fmap))
        return True

    outcome = analyze_dataset(config, entry, resolve_runtime("cpu", "fp32", False), confirm=show_and_save,
                              on_warning=output.warn)
    fmap = outcome.map
    output.success(f"Preprocessing++: {len(fmap.rank_pattern)} of {len(fmap.rank_pattern) + len(fmap.excluded_modules)} "
                   f"modules adapted in {outcome.result.seconds:.1f} s; map saved to {outcome.path}.")


def _preprocess_step(paths: DemoPaths) -> None:
    """Step 1: audio -> dataset with `sidestep preprocess`'s library call (setup already ran it: all up to date)."""
    from sidestep.data.preprocess import preprocess_audio
    from sidestep.testing.demo import demo_preprocess_config

    summary = preprocess_audio(demo_preprocess_config(paths))
    output.info(f"Preprocess: {len(summary.done)} encoded, {len(summary.skipped)} up to date, "
                f"{len(summary.failed)} failed; {summary.total_duration:.1f} s of audio in {paths.dataset}.")


def _train_step(paths: DemoPaths) -> None:
    """Step 3: a few training steps with the map the analyze step wrote (`sidestep train --max-steps 6`)."""
    from sidestep.display.training import TrainDisplay
    from sidestep.models.select import ModelChoice
    from sidestep.training.config import TrainConfig
    from sidestep.training.run import train

    entry = find_model(paths.checkpoints, DEMO_MODEL)
    config = TrainConfig(dataset_dir=paths.dataset, output_dir=paths.root / "output", rank=8, lr=1e-3, max_steps=6,
                         warmup_steps=0, save_every=0, overwrite=True)
    choice = ModelChoice(entry, paths.checkpoints, {"checkpoint_dir": "demo", "model": "demo"})
    with TrainDisplay(config.output_dir) as display:
        outcome = train(config, choice, resolve_runtime("cpu", "fp32", False), display.on_event)
    mode = "Adaptive Rank" if outcome.adaptive else "flat"
    output.success(f"Train: {outcome.steps} steps ({mode}, {outcome.modules} modules); adapter in {outcome.final_dir}.")


def _generate_step(paths: DemoPaths) -> None:
    """Step 4: listen to the adapter (`sidestep generate --adapter DIR/output`); the tiny model makes noise, not music."""
    from sidestep.generation import PromptDefaults, make_prompt
    from sidestep.models.select import ModelChoice
    from sidestep.training.generate import GenerateConfig, generate

    entry = find_model(paths.checkpoints, DEMO_MODEL)
    prompt = make_prompt("demo", {"prompt": "a bright major chord, synth", "bpm": 120, "keyscale": "C major"},
                         PromptDefaults(duration=2.0, seed=0))
    config = GenerateConfig((prompt,), paths.root / "generated", adapter=paths.root / "output", overwrite=True)
    choice = ModelChoice(entry, paths.checkpoints, {"checkpoint_dir": "demo", "model": "demo"})
    outcome = generate(config, choice, resolve_runtime("cpu", "fp32", False))
    (clip,) = outcome.clips
    wav = next(iter(clip.files.values()))
    output.success(f"Generate: {prompt.duration:g} s at {outcome.sample_rate // 1000} kHz with the adapter "
                   f"({outcome.settings.steps} steps) in {wav}; settings in {clip.settings_file.name}.")
