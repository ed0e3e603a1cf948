"""Imports every command module so each registers on the app."""

from sidestep.cli import demo_cmd, settings_cmd, wizard_cmd, analyze_cmd, preprocess_cmd, train_cmd, export_cmd, generate_cmd  # noqa: F401
