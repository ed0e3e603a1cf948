"""Running the `sidestep` CLI in-process from a test: exit code, stdout and stderr."""

from __future__ import annotations

import io
import sys

import pytest

from sidestep.cli.app import main


def run_cli(monkeypatch, capsys, *args: str, stdin: io.StringIO | None = None) -> tuple[int, str, str]:
    """`sidestep ARGS` with `stdin` (empty by default, so a prompt never waits), as (exit code, out, err)."""
    monkeypatch.setattr(sys, "argv", ["sidestep", *args])
    monkeypatch.setattr(sys, "stdin", stdin if stdin is not None else io.StringIO(""))
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err
