"""Imports every command module so each registers on the app."""

from sidestep.cli import demo_cmd, settings_cmd  # noqa: F401
