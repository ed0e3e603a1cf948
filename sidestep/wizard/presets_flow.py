"""The Presets menu: show them, save the last flow's choices under a name, delete a user preset."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from sidestep.errors import ConfigError
from sidestep.wizard.asker import Asker, Back, Option
from sidestep.wizard.common import Session
from sidestep.wizard.presets import (
    PRESET_FIELDS, builtin_presets, delete_preset, list_presets, save_preset, user_presets_dir, validate_name,
)

__all__ = ["presets_flow", "offer_save_preset", "presets_table"]


def presets_flow(asker: Asker, session: Session) -> None:
    while True:
        options = [Option("Show presets", "show")]
        if _savable(session.last_choices):
            options.append(Option("Save the last choices as a preset", "save", f"from {session.last_flow}"))
        if any(not p.builtin for p in list_presets()):
            options.append(Option("Delete a preset of yours", "delete"))
        options.append(Option("Done", "done"))
        action = asker.choice("Presets", options, default="show")
        if action == "done":
            return
        try:
            if action == "show":
                asker.say(presets_table())
            elif action == "save":
                _save(asker, session.last_choices)
            else:
                _delete(asker)
        except Back:
            continue


def offer_save_preset(asker: Asker, values: dict[str, Any]) -> None:
    """After a flow: optionally keep its choices as a named preset."""
    if _savable(values) and asker.confirm("Save these choices as a preset?", default=False):
        _save(asker, values)


def presets_table() -> Table:
    table = Table(title=f"Presets (yours are in {user_presets_dir()})", title_justify="left")
    table.add_column("Name", style="bold")
    table.add_column("Kind", style="dim")
    table.add_column("Description")
    table.add_column("Values")
    for preset in list_presets():
        values = ", ".join(f"{k}={v}" for k, v in preset.values.items())
        table.add_row(preset.name, "built-in" if preset.builtin else "yours", preset.description, values)
    return table


def _savable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in PRESET_FIELDS and v is not None}


def _save(asker: Asker, values: dict[str, Any]) -> None:
    builtins = {p.name for p in builtin_presets()}

    def check(name: str) -> str | None:
        try:
            clean = validate_name(name)
        except ConfigError as err:
            return str(err)
        return f"{clean!r} is a built-in preset; choose another name." if clean in builtins else None

    name = validate_name(asker.text("Preset name (letters, digits, - and _)", validate=check))
    existing = {p.name for p in list_presets()}
    if name in existing and not asker.confirm(f"A preset named {name!r} exists. Replace it?", default=False):
        asker.say("Nothing saved.")
        return
    description = asker.text("One-line description (optional)", default="")
    preset = save_preset(name, values, description)
    asker.say(f"[green]Preset {preset.name!r} saved to {preset.path}.[/]")


def _delete(asker: Asker) -> None:
    mine = [p for p in list_presets() if not p.builtin]
    name = asker.choice("Delete which preset?", [Option(p.name, p.name, p.description) for p in mine])
    if asker.confirm(f"Delete preset {name!r}?", default=False):
        path = delete_preset(name)
        asker.say(f"[green]Deleted {path}.[/]")
