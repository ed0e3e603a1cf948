"""`sidestep wizard` (and `sidestep` with no arguments): the interactive terminal session."""

from __future__ import annotations



def wizard() -> None:
    """Interactive menus for preprocessing, Preprocessing++, training, settings and presets."""
    start_wizard()


def start_wizard() -> None:
    """Run the wizard on the real terminal; refuses (exit 1) when stdin is not a terminal."""
    from sidestep.wizard.menu import run_wizard

    run_wizard()
