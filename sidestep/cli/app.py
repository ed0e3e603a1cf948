"""Builds the Typer app and runs it, turning every SidestepError (and every foreign failure a user can cause,
see failures.py) into one red line and exit code 1; SIDESTEP_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from sidestep.display import output
from sidestep.cli.failures import DEBUG_HINT, describe
from sidestep.cli.options import PANEL_ORDER
from sidestep.errors import Interrupted, SidestepError, TrainingDiverged

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


class _Command(TyperCommand):
    """A command whose --help reads at 80 columns: panels in one order for every command, and a `--x/--no-x`
    pair shown as `--x` with `--no-x` named in its help (a second name column would squeeze the help text and
    cut long flag names)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        params = list(self.params)
        paired = [p for p in params if isinstance(p, TyperOption) and p.secondary_opts]
        saved = [(p, p.secondary_opts, p.help) for p in paired]
        try:
            for param in paired:
                param.help = f"{(param.help or '').rstrip()} Off: {' / '.join(param.secondary_opts)}."
                param.secondary_opts = []
            self.params.sort(key=_panel_rank)  # typer lists panels in the order their first option appears
            super().format_help(ctx, formatter)
        finally:
            self.params[:] = params
            for param, secondary, text in saved:
                param.secondary_opts, param.help = secondary, text


def _panel_rank(param: Any) -> int:
    panel = getattr(param, "rich_help_panel", None)
    return PANEL_ORDER.index(panel) if panel in PANEL_ORDER else len(PANEL_ORDER)


class _Group(TyperGroup):
    command_class = _Command


app = typer.Typer(
    name="sidestep",
    help="Fine-tune ACE-Step 1.5 with LoRA adapters; Preprocessing++ picks modules and ranks from your data.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
    cls=_Group,
)


def _version(value: bool) -> None:
    if value:
        from sidestep import __version__

        output.stdout.print(f"sidestep {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_version)] = False,
) -> None:
    # `sidestep` with no command starts the interactive wizard.
    if ctx.invoked_subcommand is None:
        from sidestep.cli.wizard_cmd import start_wizard

        start_wizard()


def _register_commands() -> None:
    """Add every command of the explicit table in cli/commands.py."""
    from sidestep.cli.commands import COMMANDS, GROUPS

    for name, function in COMMANDS:
        app.command(name, cls=_Command)(function)
    for name, help_text, subcommands in GROUPS:
        group = typer.Typer(help=help_text, no_args_is_help=True, context_settings=HELP_OPTIONS, cls=_Group)
        for sub, function in subcommands:
            group.command(sub, cls=_Command)(function)
        app.add_typer(group, name=name)


_register_commands()


def main() -> None:
    from sidestep import distributed  # torchrun / accelerate launch: join the group; one process: no-op
    from sidestep.interrupts import install_sigterm

    install_sigterm()  # a `kill` stops like Ctrl-C: training saves a resumable checkpoint
    debug = os.environ.get("SIDESTEP_DEBUG") == "1"
    peer = False
    try:
        with distributed.session() as dist:
            peer = not dist.is_main
            if peer:  # only process 0 talks; the others speak only when they fail
                output.console.quiet = True
                sys.stdout = open(os.devnull, "w")
            app()
    except SidestepError as err:
        if debug:
            raise
        output.console.quiet = False
        # Process 0 already printed the sentence of a failure it shared, of a Ctrl-C that reached all, or of a
        # divergence that every process detected alike.
        if not (isinstance(err, distributed.PeerFailed) or (peer and isinstance(err, (Interrupted, TrainingDiverged)))):
            output.error(str(err))
        code = 130 if isinstance(err, Interrupted) else 1
        sys.exit(code)
    except KeyboardInterrupt:
        output.console.quiet = False
        output.error("Interrupted; nothing half-written was left behind.")
        sys.exit(130)
    except SystemExit as exited:
        # Typer turns a Ctrl-C/SIGTERM outside our own handlers (model loading, a prompt) into a silent exit 130
        if not peer and exited.code == 130 and isinstance(getattr(exited.__context__, "__cause__", None), KeyboardInterrupt):
            output.console.quiet = False
            output.error("Interrupted; nothing half-written was left behind.")
        raise
    except Exception as err:
        message = describe(err)
        if message is None or debug:
            raise  # a bug: the traceback is what to report
        output.console.quiet = False
        output.error(f"{message.rstrip('.')} ({DEBUG_HINT}).")
        sys.exit(1)
