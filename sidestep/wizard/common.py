"""Questions more than one flow asks: a preset to start from, the model, the dataset folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, MutableMapping

from sidestep import settings
from sidestep.errors import SidestepError
from sidestep.wizard.asker import Asker, Option
from sidestep.wizard.fields import problem_of
from sidestep.wizard.presets import list_presets, overlapping

__all__ = [
    "NO_PRESET", "Session", "ask_dataset", "ask_model", "ask_preset", "checkpoint_root", "model_option",
    "scan_for", "seconds_text",
]

NO_PRESET = "(none: use the defaults)"
FRAMES_PER_SECOND = 25  # ACE-Step latents (docs/checkpoints.md)
Answers = MutableMapping[str, Any]


@dataclass
class Session:
    """What lives for one wizard session: the last choices of each flow (for "save as preset")."""

    last_choices: dict[str, Any] = field(default_factory=dict)
    last_flow: str = ""
    last_output: Path | None = None  # the latest training output folder: Export's default source
    last_export_dir: Path | None = None


def checkpoint_root() -> Path:
    """The checkpoint folder from env/settings; a ConfigError pointing at Settings when there is none."""
    found = settings.resolve("checkpoint_dir")
    if found.value is None or not Path(found.value).is_dir():
        from sidestep.errors import ConfigError

        raise ConfigError(
            "No usable checkpoint folder is set; open Settings in the main menu "
            "(or run `sidestep settings set checkpoint_dir PATH`)."
        )
    return Path(found.value)


def model_option(entry: Any) -> Option:
    kind = "official" if entry.official else f"fine-tune of {entry.variant or 'unknown variant'}"
    turbo = " · turbo" if entry.is_turbo else ""
    return Option(entry.name, entry, f"{kind}, {entry.layout.value} layout{turbo}")


def ask_preset(asker: Asker, answers: Answers, fields: Mapping[str, str] | Iterable[str],
               defaults_key: str = "preset_values") -> str:
    """Optional first step: pick a preset whose overlapping fields become this flow's defaults.

    Args:
        fields: the preset fields this flow uses, or a mapping preset field -> the flow's answer key.
    """
    keys = dict(fields) if isinstance(fields, Mapping) else {name: name for name in fields}
    options = [Option(NO_PRESET, "")]
    for preset in list_presets():
        shown = ", ".join(f"{k}={v}" for k, v in overlapping(preset, keys).items())
        if shown:
            options.append(Option(preset.name, preset.name, f"{preset.description} [{shown}]"))
    picked = asker.choice("Load defaults from a preset?", options, default=answers.get("preset", ""))
    values = {}
    if picked:
        preset = next(p for p in list_presets() if p.name == picked)
        values = overlapping(preset, keys)
        # A preset replaces earlier answers to its fields, so its values show up as the defaults.
        for key in values:
            answers.pop(keys[key], None)
    answers[defaults_key] = values
    return picked


def ask_model(asker: Asker, answers: Answers, key: str = "model",
              question: str = "Which model? (the one you will train on; base is recommended)") -> Any:
    """Model selection from the checkpoint folder: official and fine-tunes labelled; returns a ModelChoice."""
    from sidestep.display import output

    with output.status("Looking for models…"):  # the first call imports torch: seconds on a busy machine
        from sidestep.models import discover_models
        from sidestep.models.select import choose_model
        from sidestep.models.variants import VARIANTS

        root = checkpoint_root()
        entries = discover_models(root)
    if not entries:
        from sidestep.errors import CheckpointError

        raise CheckpointError(f"No ACE-Step model folder found under {root}; check the checkpoint folder in Settings.")
    previous = answers.get(key)
    default = previous.entry.name if previous is not None else _settings_model_name(root, entries)
    by_name = {e.name: e for e in entries}
    options = [Option(o.label, o.value.name, o.hint) for o in map(model_option, entries)]
    name = asker.choice(question, options,
                        default=default if default in by_name else None)
    entry = by_name[name]
    base_variant = None
    if entry.variant is None:
        base_variant = asker.choice(f"{entry.name} does not say which official model it was fine-tuned from; which?",
                                    list(VARIANTS), default="base")
    return choose_model(root, entry.name, base_variant)


def _settings_model_name(root: Path, entries: list[Any]) -> str | None:
    from sidestep.models import find_model

    try:
        return find_model(root, settings.resolve("model").value).name
    except SidestepError:
        return entries[0].name if entries else None


def scan_for(folder: Path, entry: Any) -> Any:
    """Validate a dataset folder for this model (reads every sample; raises DatasetError)."""
    from sidestep.data import DatasetSpec, scan_dataset

    return scan_dataset(folder, DatasetSpec.from_model_config(entry.config) if entry else DatasetSpec())


def ask_dataset(asker: Asker, answers: Answers, model_key: str = "model", key: str = "dataset_dir") -> Path:
    """Dataset folder, validated on entry; says how many samples it holds. The scan is kept in answers."""
    choice = answers.get(model_key)
    entry = choice.entry if choice is not None else None
    scans: dict[Path, Any] = {}
    songs: dict[Path, int] = {}

    def check(folder: Path) -> str | None:
        try:
            scans[folder] = scan_for(folder, entry)
        except SidestepError as err:
            songs[folder] = _audio_count(folder)
            return None if songs[folder] else str(err)  # songs, not tensors: offered below
        return None

    while True:
        folder = asker.folder("Dataset folder (the preprocessed .pt files)", default=answers.get(key), validate=check)
        if folder in scans:
            break
        made = _offer_preprocess(asker, folder, songs[folder], choice)
        if made is not None:
            folder = made
            break
    scan = scans.get(folder) or scan_for(folder, entry)
    answers["scan"] = scan
    minutes = scan.total_frames / FRAMES_PER_SECOND / 60
    asker.say(f"[green]✓[/] {len(scan.files)} samples, {minutes:.1f} min of audio in {folder}")
    return folder


def _audio_count(folder: Path) -> int:
    from sidestep.data.audio import find_audio_files

    try:
        return len(find_audio_files(folder))
    except (OSError, SidestepError):
        return 0


def _offer_preprocess(asker: Asker, folder: Path, count: int, choice: Any) -> Path | None:
    """A folder of songs where tensors were asked for: offer to preprocess it; the new dataset, or None."""
    from sidestep.wizard.asker import Back

    if not asker.confirm(f"{folder} holds {count} audio files, not preprocessed .pt files. Preprocess them now?",
                         default=True):
        return None
    from sidestep.models.select import choose_model
    from sidestep.wizard.preprocess_flow import preprocess_songs

    model = choice if choice is not None else choose_model(None, None, base_variant="base")
    try:
        summary = preprocess_songs(asker, {"model": model, "audio_dir": folder})
    except Back:
        return None
    if summary is None or not (summary.done or summary.skipped):
        return None
    return Path(summary.output_dir)


def ask_optional_file(asker: Asker, question: str, previous: Any, read: Callable[[Path], object]) -> Path | None:
    """A path the user may leave empty (None); `read` must accept it, else its one-sentence error is shown and
    the question asked again."""

    def check(raw: str) -> str | None:
        return problem_of(lambda: read(Path(raw.strip()).expanduser())) if raw.strip() else None

    raw = asker.text(question, default="" if previous is None else str(previous), validate=check).strip()
    return Path(raw).expanduser() if raw else None


def seconds_text(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"
