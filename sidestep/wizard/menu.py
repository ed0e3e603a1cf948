"""The main menu: pick an action, run its flow, come back here until Quit (or Ctrl-C at the menu)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from sidestep import settings
from sidestep.errors import ConfigError, SidestepError
from sidestep.wizard.asker import Asker, Back, Cancel, Option, QuestionaryAsker, stdin_is_terminal
from sidestep.wizard.common import Session

__all__ = ["MENU", "NOT_A_TERMINAL", "run_wizard"]

NOT_A_TERMINAL = (
    "The wizard needs an interactive terminal (stdin is not a TTY); use the commands instead: "
    "sidestep preprocess, sidestep analyze, sidestep train, sidestep generate, sidestep settings (see sidestep --help)."
)

MENU = [
    Option("Preprocess audio", "preprocess", "audio files → training tensors (.pt)"),
    Option("Preprocessing++ (auto-targeting + adaptive ranks)", "analysis",
           "measure which modules react to your data; writes fisher_map.json"),
    Option("Train", "train", "train a LoRA adapter (uses fisher_map.json when present)"),
    Option("Export", "export", "a trained adapter for ComfyUI, diffusers or peft"),
    Option("Generate", "generate", "render audio from a prompt, with the base model or a trained adapter"),
    Option("Settings", "settings", "checkpoint folder, default model, device"),
    Option("Presets", "presets", "show, save or delete named defaults"),
    Option("Quit", "quit"),
]


def run_wizard(asker: Asker | None = None) -> None:
    """Run the interactive session until the user quits.

    Args:
        asker: how to ask; `None` means the real terminal, which must be interactive (ConfigError otherwise).
    """
    if asker is None:
        if not stdin_is_terminal():
            raise ConfigError(NOT_A_TERMINAL)
        asker = QuestionaryAsker()
    session = Session()
    if not _setup_done():
        _first_run(asker)
    action = "analysis"
    while True:
        try:
            action = asker.choice("What do you want to do?", MENU, default=action, back=False)
        except (Back, Cancel):
            break
        if action == "quit":
            break
        _run_action(asker, action, session)
    asker.say("Bye.")


def _setup_done() -> bool:
    """Done once a checkpoint folder is set anywhere: the wizard's setup, `settings set`, or the environment."""
    if settings.load_settings().first_run_done:
        return True
    folder = settings.resolve("checkpoint_dir").value
    return folder is not None and folder.is_dir()


def _first_run(asker: Asker) -> None:
    from sidestep.wizard.settings_flow import first_run_setup

    try:
        first_run_setup(asker)
    except (Back, Cancel):
        asker.say("Setup skipped; you can finish it any time under Settings.")
    except SidestepError as err:
        asker.say(f"[bold red]Error:[/] {err}")


_FLOWS = {
    "preprocess": ("sidestep.wizard.preprocess_flow", "preprocess_flow"),
    "analysis": ("sidestep.wizard.analysis_flow", "analysis_flow"),
    "train": ("sidestep.wizard.train_flow", "train_flow"),
    "export": ("sidestep.wizard.export_flow", "export_flow"),
    "generate": ("sidestep.wizard.generate_flow", "generate_flow"),
    "settings": ("sidestep.wizard.settings_flow", "settings_flow"),
    "presets": ("sidestep.wizard.presets_flow", "presets_flow"),
}


def _flow(action: str) -> Callable[[Asker, Session], Any]:
    # Imported on use: the analysis and training flows pull in torch, the menu should appear at once.
    module, name = _FLOWS[action]
    return getattr(importlib.import_module(module), name)


def _run_action(asker: Asker, action: str, session: Session) -> None:
    """Run one flow; whatever happens, the session returns to the menu."""
    try:
        _flow(action)(asker, session)
    except Back:
        asker.say("[dim]Back to the main menu.[/]")
    except Cancel:
        asker.say("[dim]Cancelled; back to the main menu.[/]")
    except KeyboardInterrupt:
        asker.say("[yellow]Stopped; back to the main menu.[/]")
    except SidestepError as err:
        asker.say(f"[bold red]Error:[/] {err}")
