"""The benchmarks' shared command-line pattern: size options that override a named preset."""

from __future__ import annotations

import argparse
import json
from typing import Callable


def parse_with_preset(parser: argparse.ArgumentParser, sizes: dict[str, type], presets: dict[str, dict],
                      argv: list[str] | None) -> argparse.Namespace:
    """Add `--NAME` for every size (default None), parse, then fill what was not given from the preset.

    The preset is "quick" when the parser has a true `--quick`, else "default"; its keys use underscores.
    """
    group = parser.add_argument_group("sizes (override the preset)")
    for name, kind in sizes.items():
        group.add_argument(f"--{name}", type=kind, default=None)
    args = parser.parse_args(argv)
    for key, value in presets["quick" if getattr(args, "quick", False) else "default"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def finish(summary: dict, records: list[dict], cells: list[dict], args: argparse.Namespace,
           emit: Callable[[str], None], log: Callable[[str], None], markdown: Callable[[], str]) -> dict:
    """Emit the summary line, log its verdicts, write --out (everything) and --markdown (the tables)."""
    emit(json.dumps(summary))
    for line in summary["verdicts"]:
        log(line)
    if args.out:
        args.out.write_text(json.dumps({"records": records, "cells": cells, **summary}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown())
    return summary
