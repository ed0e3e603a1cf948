"""`sidestep preprocess`: audio files -> training `.pt` files, with progress bars and a summary table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sidestep.display import output
from sidestep.cli.options import ADVANCED, COMMON, CheckpointDirOpt, DeviceOpt, JsonOpt, ModelOpt, PrecisionOpt, SeedOpt
from sidestep.errors import DatasetError

if TYPE_CHECKING:
    from sidestep.data.preprocess import PreprocessEvent, PreprocessSummary

AudioDirOpt = Annotated[Path, typer.Option(
    "--audio-dir", help="Folder of audio files (wav, flac, mp3, ogg; searched recursively).", show_default=False, rich_help_panel=COMMON)]
OutputOpt = Annotated[Path, typer.Option(
    "--output", "-o", help="Folder to write the .pt training files to.", show_default=False, rich_help_panel=COMMON)]
DatasetJsonOpt = Annotated[Path | None, typer.Option(
    "--dataset-json", help="JSON with per-file caption, lyrics, bpm, keyscale, language, is_instrumental "
                           "(beats sidecar .json/.caption.txt/.lyrics.txt files).", show_default=False, rich_help_panel=COMMON)]
MaxDurationOpt = Annotated[float | None, typer.Option(
    "--max-duration", help="Split longer songs into equal chunks of at most this many seconds (default: whole songs).",
    show_default=False, rich_help_panel=ADVANCED)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo files whose output is already up to date.", rich_help_panel=ADVANCED)]
_TABLE_ROWS = 50  # beyond this many files, the table lists only the ones that were not skipped


def preprocess(
    audio_dir: AudioDirOpt,
    output_dir: OutputOpt,
    dataset_json: DatasetJsonOpt = None,
    max_duration: MaxDurationOpt = None,
    force: ForceOpt = False,
    checkpoint_dir: CheckpointDirOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = 0,
    json: JsonOpt = False,
) -> None:
    """Encode a folder of songs into training tensors (VAE latents + text/lyrics condition), skipping up-to-date files."""
    from sidestep.data.preprocess import PreprocessConfig, preprocess_audio  # imports torch: keep --help fast
    from sidestep.models.select import choose_model, choose_runtime

    choice = choose_model(checkpoint_dir, model, base_variant="base")
    runtime = choose_runtime(device, precision, False)
    config = PreprocessConfig(audio_dir=audio_dir, output_dir=output_dir, checkpoint_dir=choice.checkpoint_dir,
                              model=choice.entry.name, dataset_json=dataset_json, max_duration=max_duration,
                              force=force, seed=seed, runtime=runtime)
    if not json:
        output.info(f"Preprocessing {audio_dir} -> {output_dir} for {choice.entry.label}.")
    with _progress(enabled=not json) as on_event:
        summary = preprocess_audio(config, on_event)
    if json:
        output.emit_json(summary.to_json())
    else:
        _render(summary)
    if summary.outcomes and not summary.done and not summary.skipped:
        raise DatasetError(f"None of the {len(summary.failed)} audio files in {audio_dir} could be preprocessed.")


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[PreprocessEvent], None]]:
    """An overall bar (files) and a per-file bar (decode, encode and write steps) on stderr."""
    if not enabled:
        yield lambda event: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=output.console, transient=True) as bar:
        overall = bar.add_task("Files", total=None)
        current = bar.add_task("", total=1)

        def on_event(event: PreprocessEvent) -> None:
            stage = event.stage.value
            if stage == "start":
                bar.update(overall, total=event.total, completed=event.index)
                bar.update(current, description=event.source, total=1, completed=0)
            elif stage == "load models":
                bar.update(current, description="loading the VAE and encoders")
            elif stage == "finish":
                bar.update(overall, completed=event.index + 1)
                bar.update(current, completed=1, total=1)
            else:
                bar.update(current, description=f"{event.source}: {stage}", total=event.steps, completed=event.step)

        yield on_event


def _render(summary: PreprocessSummary) -> None:
    from sidestep.data.metadata import DEFAULT_CAPTION

    if summary.runtime_reason:
        output.info(f"Encoders ran on {summary.runtime_reason}.")
    rows = summary.outcomes
    if len(rows) > _TABLE_ROWS:
        rows = tuple(o for o in rows if o.status.value != "skipped")
    if rows:
        table = Table(title=f"Preprocessed into {summary.output_dir}", title_justify="left")
        for column in ("File", "Status", "Outputs", "Seconds", "Metadata", "Reason"):
            table.add_column(column, overflow="fold")
        style = {"done": "green", "skipped": "dim", "failed": "red"}
        for o in rows:
            outputs = o.outputs[0] if len(o.outputs) == 1 else f"{len(o.outputs)} chunks" if o.outputs else "-"
            reason = o.reason.removeprefix(f"{Path(o.source).name}: ")  # the File column already names it
            table.add_row(o.source, f"[{style[o.status.value]}]{o.status.value}[/]", outputs, f"{o.duration:.1f}",
                          o.metadata_source.value if o.metadata_source else "-", reason)
        output.console.print(table)
    minutes, seconds = divmod(summary.total_duration, 60)
    output.info(f"{len(summary.done)} done, {len(summary.skipped)} skipped (up to date), {len(summary.failed)} failed; "
                f"{int(minutes)} min {seconds:.1f} s of audio in {summary.output_dir}.")
    if summary.defaulted:
        output.warn(f"{len(summary.defaulted)} track(s) had no metadata and were encoded as instrumental with the "
                    f"caption '{DEFAULT_CAPTION}'; add --dataset-json or sidecar files for better captions.")
    if summary.unmatched_json:
        output.warn(f"{len(summary.unmatched_json)} --dataset-json entries named no audio file "
                    f"(e.g. {', '.join(summary.unmatched_json[:3])}).")
    if summary.failed and (summary.done or summary.skipped):
        output.warn(f"{len(summary.failed)} file(s) could not be preprocessed and were skipped; see the table.")
