"""Builds the Typer app and runs it, turning every SidestepError (and every foreign failure a user can cause,
see failures.py) into one red line and exit code 1; SIDESTEP_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import os
import sys

import typer

from sidestep.display import output
from sidestep.cli.failures import DEBUG_HINT, describe
from sidestep.errors import Interrupted, SidestepError, TrainingDiverged

app = typer.Typer(
    name="sidestep",
    help="Fine-tune ACE-Step 1.5 with LoRA adapters; Preprocessing++ picks modules and ranks from your data.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    # `sidestep` with no command starts the interactive wizard.
    if ctx.invoked_subcommand is None:
        from sidestep.cli.wizard_cmd import start_wizard

        start_wizard()


def _register_commands() -> None:
    # Each command module adds itself to `app`; imported here so `app` exists first.
    from sidestep.cli import commands  # noqa: F401


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
