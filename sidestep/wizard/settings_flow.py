"""Settings in the wizard: the first-run setup (checkpoint folder, default model) and editing later.

Everything is stored through `sidestep.settings`, the same file `sidestep settings set` writes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from sidestep import settings
from sidestep.wizard.asker import Asker, Back, Option
from sidestep.wizard.common import Answers, model_option
from sidestep.wizard.fields import problem_of
from sidestep.wizard.steps import Step, help_of, run_steps

__all__ = ["first_run_setup", "settings_flow"]

_DEVICES = ("auto", "cpu", "cuda", "mps")
_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DONE = "done"


def first_run_setup(asker: Asker) -> settings.Settings:
    """Ask for the checkpoint folder and the default model, then mark the first run as done."""
    asker.say("[bold]Welcome to sidestep.[/] First, where are your ACE-Step 1.5 checkpoints?")
    current = settings.load_settings()
    answers: dict[str, Any] = {"checkpoint_dir": current.checkpoint_dir, "model": current.model}
    run_steps(asker, [Step("checkpoint_dir", _ask_checkpoint_dir), Step("model", _ask_default_model)], answers)
    updated = replace(current, checkpoint_dir=answers["checkpoint_dir"], model=answers["model"], first_run_done=True)
    path = settings.save_settings(updated)
    asker.say(f"[green]Saved to {path}.[/] Change these any time under Settings.")
    return updated


def settings_flow(asker: Asker, _session: Any = None) -> None:
    """Show the settings and edit one at a time until the user is done."""
    while True:
        current = settings.load_settings()
        options = [Option(_label(key, getattr(current, key)), key, help_of(settings.Settings, key))
                   for key in ("checkpoint_dir", "model", "device", "precision")]
        options.append(Option("Done", _DONE))
        key = asker.choice("Settings: which one do you want to change?", options, default=_DONE)
        if key == _DONE:
            return
        answers: dict[str, Any] = {key: getattr(current, key), "checkpoint_dir": current.checkpoint_dir}
        ask = {"checkpoint_dir": _ask_checkpoint_dir, "model": _ask_default_model,
               "device": _ask_device, "precision": _ask_precision}[key]
        try:
            value = ask(asker, answers)
        except Back:
            continue
        changes = {key: value, "first_run_done": True} if key == "checkpoint_dir" and value else {key: value}
        updated = replace(current, **changes)
        settings.save_settings(updated)
        asker.say(f"[green]{key} = {_shown(value, key)} saved.[/]")


# ---- questions -----------------------------------------------------------------------------------------------

def _ask_checkpoint_dir(asker: Asker, answers: Answers) -> Path:
    from sidestep.models import discover_models
    from sidestep.models.discovery import require_models

    def check(folder: Path) -> str | None:
        return problem_of(lambda: require_models(folder))  # the same rule as `sidestep settings set checkpoint_dir`

    folder = asker.folder("Checkpoint folder (holds acestep-v15-base/, acestep-v15-turbo/, ...)",
                          default=answers.get("checkpoint_dir"), validate=check)
    names = ", ".join(e.name for e in discover_models(folder))
    asker.say(f"[green]✓[/] Models found: {names}")
    return folder


def _ask_default_model(asker: Asker, answers: Answers) -> str:
    from sidestep.models import discover_models
    from sidestep.models.variants import folder_for

    root = answers.get("checkpoint_dir") or settings.resolve("checkpoint_dir").value
    entries = discover_models(Path(root)) if root else []
    if not entries:
        return asker.text("Default model (turbo, base, sft, xl-base, ... or a folder name)",
                          default=answers.get("model") or "base", validate=_model_problem)
    options = [Option(o.label, _setting_name(o.value), o.hint) for o in map(model_option, entries)]
    previous = answers.get("model")
    default = previous if previous in {o.value for o in options} else None
    if default is None and previous:
        default = next((o.value for o in options if o.label == folder_for(previous)), None)
    return asker.choice("Default model (used when a command gets no --model)", options, default=default)


def _setting_name(entry: Any) -> str:
    """Official folders are stored by variant name (`base`), anything else by folder name."""
    from sidestep.models.variants import folder_for

    if entry.official and entry.variant and folder_for(entry.variant) == entry.name:
        return entry.variant
    return entry.name


def _model_problem(value: str) -> str | None:
    return problem_of(lambda: settings.resolve("model", value))


def _ask_device(asker: Asker, answers: Answers) -> str | None:
    picked = asker.choice("Compute device", list(_DEVICES), default=answers.get("device") or "auto")
    return None if picked == "auto" else picked


def _ask_precision(asker: Asker, answers: Answers) -> str | None:
    picked = asker.choice("Precision", list(_PRECISIONS), default=answers.get("precision") or "auto")
    return None if picked == "auto" else picked


def _label(key: str, value: Any) -> str:
    return f"{key}: {_shown(value, key)}"


def _shown(value: Any, key: str = "") -> str:
    if value is None:
        return "(not set)" if key == "checkpoint_dir" else "(auto)"
    return str(value)
