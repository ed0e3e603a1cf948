"""`sidestep demo`: set up the tiny demo and run the main job on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sidestep.display import output
from sidestep.cli.app import app


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the demo checkpoint and dataset.")] = Path("sidestep-demo"),
    setup_only: Annotated[bool, typer.Option("--setup-only", help="Write the demo files and stop.")] = False,
) -> None:
    """Write a tiny ACE-Step checkpoint and dataset (no download), then run the main job on them."""
    from sidestep.testing.demo import setup_demo  # imports torch: keep `sidestep --help` fast

    paths = setup_demo(directory)
    output.info(f"Demo checkpoint: {paths.model_dir}")
    output.info(f"Demo dataset:    {paths.dataset}")
    if setup_only:
        return
    from sidestep.cli.demo_run import run_demo_job

    run_demo_job(paths)
