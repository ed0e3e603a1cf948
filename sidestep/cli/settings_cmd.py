"""`sidestep settings show|set|reset|path`: view and change the persistent defaults."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from sidestep import settings
from sidestep.display import output
from sidestep.cli.options import JsonOpt

HELP = "Show and change the defaults used when a flag is not given (flag > env > settings file > default)."

KeyArg = Annotated[str, typer.Argument(help=f"One of: {', '.join(settings.SETTING_KEYS)}.", show_default=False)]
ValueArg = Annotated[
    str, typer.Argument(help="The new value; 'none' clears checkpoint_dir, device or precision.", show_default=False)
]


def show(json: JsonOpt = False) -> None:
    """Show each setting, its effective value and where that value comes from."""
    resolved = {key: settings.resolve(key) for key in settings.SETTING_KEYS}
    path = settings.settings_path()
    if json:
        output.emit_json(
            {
                "settings_file": str(path),
                "settings": {k: {"value": _jsonable(r.value), "source": r.source} for k, r in resolved.items()},
            }
        )
        return
    table = Table(title=f"Settings ({path})", title_justify="left")
    table.add_column("Setting", style="bold")
    table.add_column("Value")
    table.add_column("Source", style="dim")
    table.add_column("Meaning", style="dim")
    helps = {f.name: f.metadata.get("help", "") for f in fields(settings.Settings)}
    for key, found in resolved.items():
        table.add_row(key, Text(_shown(found.value)), found.source, helps[key])
    output.stdout.print(table)


def set_(key: KeyArg, value: ValueArg) -> None:
    """Store one setting in the settings file (a checkpoint folder must hold models, a model must be in it)."""
    updated = settings.set_value(key, value, check=_check_setting)
    output.success(f"{key} = {_shown(getattr(updated, key))} saved to {settings.settings_path()}")
    env_name = settings.ENV_VARS.get(key)
    if env_name and settings.resolve(key).source == f"env {env_name}":
        output.warn(f"{env_name} is set in the environment and takes precedence over the settings file.")


def reset() -> None:
    """Move the settings file to settings.json.bak and write the defaults."""
    backup = settings.reset_settings()
    if backup is not None:
        output.info(f"Previous settings kept in {backup}")
    output.success(f"Settings reset to defaults in {settings.settings_path()}")


def path() -> None:
    """Print the settings file's path (the folder is set by SIDESTEP_CONFIG_DIR when given)."""
    output.stdout.print(str(settings.settings_path()), markup=False, soft_wrap=True)


# The `sidestep settings` subcommands, registered by cli/commands.py.
SUBCOMMANDS = (("show", show), ("set", set_), ("reset", reset), ("path", path))


def _check_setting(key: str, value: Any) -> None:
    """The wizard's checks, so a typo is refused here rather than at the next command's start."""
    if key == "checkpoint_dir":
        from sidestep.models.discovery import require_models

        entries = require_models(value)
        output.info(f"Models found: {', '.join(e.name for e in entries)}")
    elif key == "model":
        root = settings.resolve("checkpoint_dir").value
        if root is not None and root.is_dir():  # without a folder only the spelling can be checked (done)
            from sidestep.errors import ConfigError
            from sidestep.models.discovery import find_model

            try:
                find_model(root, value)
            except ConfigError:  # a fine-tune without a known parent is still a model that exists
                pass


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, str)) else str(value)


def _shown(value: Any) -> str:
    if value is None:
        return "(not set)"
    return str(value).lower() if isinstance(value, bool) else str(value)
