"""The one place sidestep talks to the terminal. Messages go to stderr so stdout can carry --json."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False)


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]Warning:[/] {message}")


def error(message: str) -> None:
    # escaped: a file name or a foreign message may hold "[...]", which rich would read as markup
    console.print(f"[bold red]Error:[/] {escape(message)}")


def success(message: str) -> None:
    console.print(f"[green]{message}[/]")


def emit_json(payload: Any) -> None:
    """Machine-readable result on stdout, nothing else on that stream."""
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with `message` on a terminal while something slow runs (loading a model); silent otherwise, so
    logs and one-line errors stay as they are."""
    if not console.is_terminal or console.quiet:
        yield
        return
    with console.status(message, spinner="dots"):
        yield
