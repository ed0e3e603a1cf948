"""The command table: every `sidestep` command and the function it runs, in the order `--help` lists them.

app.py adds each with `app.command`; a command module only defines its function (no import side effects).
"""

from __future__ import annotations

from typing import Callable

from sidestep.cli import (analyze_cmd, demo_cmd, export_cmd, generate_cmd, preprocess_cmd, settings_cmd, train_cmd,
                          wizard_cmd)

__all__ = ["COMMANDS", "GROUPS"]

COMMANDS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("demo", demo_cmd.demo),
    ("wizard", wizard_cmd.wizard),
    ("preprocess", preprocess_cmd.preprocess),
    ("analyze", analyze_cmd.analyze),
    ("train", train_cmd.train),
    ("export", export_cmd.export),
    ("generate", generate_cmd.generate),
)

# Commands with subcommands: (name, help, ((subcommand, function), ...)).
GROUPS: tuple[tuple[str, str, tuple[tuple[str, Callable[..., None]], ...]], ...] = (
    ("settings", settings_cmd.HELP, settings_cmd.SUBCOMMANDS),
)
