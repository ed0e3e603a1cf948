"""The terminal face of the CLI: --help at 80 columns, -h, --version, the command table, demo --setup-only."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from sidestep import __version__
from sidestep.cli.app import app
from sidestep.cli.commands import COMMANDS, GROUPS
from sidestep.cli.options import PANEL_ORDER

from cli_support import run_cli


def _commands() -> list[tuple[list[str], object]]:
    """Every command of the app as (argv prefix, click command), groups and their subcommands included."""
    root = typer.main.get_command(app)
    found: list[tuple[list[str], object]] = [([], root)]
    for name, command in root.commands.items():
        found.append(([name], command))
        for sub, inner in getattr(command, "commands", {}).items():
            found.append(([name, sub], inner))
    return found


def _help(args: list[str], flag: str = "--help") -> str:
    result = CliRunner().invoke(app, [*args, flag], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}, color=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("args, command", _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_help_fits_80_columns_and_never_cuts_a_flag_name(args, command):
    text = _help(args)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text  # rich marks a cut cell with an ellipsis
    words = set(re.findall(r"--?[A-Za-z][\w-]*", text))
    for param in command.params:
        for flag in [*param.opts, *param.secondary_opts]:
            if flag.startswith("-"):
                assert flag in words, f"{' '.join(args)}: {flag} is missing or broken at 80 columns"
    panels = [p for p in re.findall(r"╭─ (.+?) ─", text) if p in PANEL_ORDER]
    assert panels == sorted(panels, key=PANEL_ORDER.index)  # Common, Schedule, Memory, Validation…, Advanced


def test_every_command_with_options_groups_them_in_the_agreed_panels():
    for args, command in _commands():
        panels = {getattr(p, "rich_help_panel", None) for p in command.params if p.name != "help"}
        if args and args[0] not in ("settings", "wizard") and command.params:
            assert panels <= set(PANEL_ORDER) | {None} and panels & set(PANEL_ORDER), args


def test_dash_h_is_help_everywhere():
    for args, _ in _commands():
        assert _help(args, "-h") == _help(args, "--help")


def test_version_prints_the_package_version(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"sidestep {__version__}" and err == ""


def test_commands_come_from_the_explicit_table():
    root = typer.main.get_command(app)
    assert list(root.commands) == [name for name, _ in COMMANDS] + [name for name, _, _ in GROUPS]
    for name, function in COMMANDS:
        assert root.commands[name].callback.__name__ == function.__name__


@pytest.mark.slow
def test_demo_setup_only_lists_every_file_it_writes(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "demo", "--setup-only", str(tmp_path / "demo"))
    assert code == 0, err
    written = sorted(p for p in (tmp_path / "demo").rglob("*") if p.is_file())
    assert written
    lines = err.splitlines()
    assert f"Wrote {len(written)} files" in err
    for path in written:
        folder = f"{path.parent.relative_to(tmp_path / 'demo')}/"
        assert any(line.strip().startswith(folder + " ") and path.name in line for line in lines), path
    assert "Next: `sidestep analyze" in err


def test_status_spins_on_a_terminal_and_stays_silent_in_a_log(monkeypatch):
    import io

    from rich.console import Console

    from sidestep.display import output

    for terminal in (True, False):
        sink = io.StringIO()
        monkeypatch.setattr(output, "console", Console(file=sink, force_terminal=terminal, width=80))
        with output.status("Loading the model…"):
            pass
        assert ("Loading the model" in sink.getvalue()) is terminal
