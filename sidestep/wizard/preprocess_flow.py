"""Preprocess in the wizard: audio folder → output folder → optional dataset JSON → `preprocess_audio`, as the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidestep.errors import SidestepError
from sidestep.wizard.asker import Asker
from sidestep.wizard.common import Answers, Session
from sidestep.wizard.fields import problem_of
from sidestep.wizard.steps import Step, run_steps

__all__ = ["preprocess_flow", "preprocess_songs", "build_preprocess_config"]


def preprocess_flow(asker: Asker, session: Session) -> None:
    """Ask, confirm, encode the songs; then offer Preprocessing++ on the new dataset."""
    from sidestep.models.select import choose_model

    # Like `sidestep preprocess`: the model (for its condition encoder) comes from the settings.
    summary = preprocess_songs(asker, {"model": choose_model(None, None, base_variant="base")})
    if summary is not None and (summary.done or summary.skipped):
        if asker.confirm("Run Preprocessing++ on this dataset now?", default=True):
            from sidestep.wizard.analysis_flow import analysis_flow

            analysis_flow(asker, session, start={"dataset_dir": summary.output_dir})


def preprocess_songs(asker: Asker, start: Answers) -> Any:
    """The preprocess questions (those `start` answers are skipped) and the run; the summary, or None."""
    answers: dict[str, Any] = dict(start)
    given = set(answers)
    run_steps(asker, [s for s in _steps() if s.key not in given], answers)
    if not answers["go"]:
        asker.say("Nothing was written.")
        return None
    return _run(asker, build_preprocess_config(answers))


def _steps() -> list[Step]:
    return [
        Step("audio_dir", _ask_audio_dir),
        Step("output_dir", _ask_output_dir),
        Step("dataset_json", _ask_dataset_json),
        Step("go", _confirm),
    ]


def build_preprocess_config(answers: Answers) -> Any:
    """The answers as a `PreprocessConfig` exactly as `sidestep preprocess` builds it."""
    from sidestep.data.preprocess import PreprocessConfig
    from sidestep.models.select import choose_runtime

    choice = answers["model"]
    output_dir = answers.get("output_dir") or answers["audio_dir"]
    return PreprocessConfig(audio_dir=answers["audio_dir"], output_dir=output_dir,
                            checkpoint_dir=choice.checkpoint_dir, model=choice.entry.name,
                            dataset_json=answers.get("dataset_json"), runtime=choose_runtime(None, None, False))


def _ask_audio_dir(asker: Asker, answers: Answers) -> Path:
    from sidestep.data.audio import find_audio_files

    def check(folder: Path) -> str | None:
        if not find_audio_files(folder):
            return f"{folder} holds no audio files (wav, flac, mp3, ogg, opus, m4a, aiff)."
        return None

    folder = asker.folder("Audio folder (your songs; searched recursively)", default=answers.get("audio_dir"),
                          validate=check)
    asker.say(f"[green]✓[/] {len(find_audio_files(folder))} audio files")
    return folder


def _ask_output_dir(asker: Asker, answers: Answers) -> Path:
    audio = Path(answers["audio_dir"])
    default = answers.get("output_dir") or audio.parent / f"{audio.name}-tensors"
    return asker.folder("Output folder for the .pt training files", default=default, must_exist=False)


def _ask_dataset_json(asker: Asker, answers: Answers) -> Path | None:
    def check(text: str) -> str | None:
        if text.strip().lower() in ("", "none"):
            return None
        path = Path(text.strip()).expanduser()
        return problem_of(lambda: build_preprocess_config({**answers, "dataset_json": path}))

    previous = answers.get("dataset_json")
    text = asker.text("Dataset JSON with captions/lyrics (optional; Enter or none = sidecar files or defaults)",
                      default=str(previous) if previous else "none", validate=check)
    return None if text.strip().lower() in ("", "none") else Path(text.strip()).expanduser().resolve()


def _confirm(asker: Asker, answers: Answers) -> bool:
    from sidestep.data.audio import find_audio_files

    count = len(find_audio_files(answers["audio_dir"]))
    meta = answers.get("dataset_json") or "sidecar files next to each song, else instrumental with a generic caption"
    asker.say(f"Preprocess {count} audio files with {answers['model'].entry.label}\n"
              f"  into {answers['output_dir']}\n  metadata: {meta}\n"
              "  [dim]outputs that are already up to date are skipped[/]")
    return asker.confirm("Start preprocessing?", default=True)


def _run(asker: Asker, config: Any) -> Any:
    from sidestep.data.preprocess import preprocess_audio

    with asker.progress("Preprocessing") as bar:
        def on_event(event: Any) -> None:
            if event.stage.value == "start":
                bar(event.index, event.total, event.source)
            elif event.stage.value == "finish":
                bar(event.index + 1, event.total, event.source)

        summary = preprocess_audio(config, on_event)
    failed = summary.failed
    asker.say(f"[green]✓[/] {len(summary.done)} done, {len(summary.skipped)} skipped (up to date), "
              f"{len(failed)} failed; dataset in {summary.output_dir}")
    for outcome in failed[:10]:
        asker.say(f"[red]  {outcome.source}: {outcome.reason}[/]")
    if summary.defaulted:
        asker.say(f"[yellow]{len(summary.defaulted)} track(s) had no metadata and were encoded as instrumental "
                  "with a generic caption.[/]")
    if not summary.done and not summary.skipped:
        raise _nothing_usable(config, len(failed))
    return summary


def _nothing_usable(config: Any, failed: int) -> SidestepError:
    from sidestep.errors import DatasetError

    return DatasetError(f"None of the {failed} audio files in {config.audio_dir} could be preprocessed.")
