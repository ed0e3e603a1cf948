"""`sidestep demo`: set up the tiny demo and run the main job on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sidestep.cli.options import COMMON
from sidestep.display import output


def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the demo checkpoint and dataset.")] = Path("sidestep-demo"),
    setup_only: Annotated[bool, typer.Option("--setup-only", help="Write the demo files, list them, and stop.",
                                                    rich_help_panel=COMMON)] = False,
) -> None:
    """Write a tiny ACE-Step checkpoint and dataset (no download), then run the main job on them."""
    from sidestep.testing.demo import setup_demo  # imports torch: keep `sidestep --help` fast

    with output.status("Writing the demo checkpoint and preprocessing its clips…"):
        paths = setup_demo(directory)
    _print_written(paths.root)
    output.info(f"Demo checkpoint: {paths.model_dir}")
    output.info(f"Demo dataset:    {paths.dataset}")
    if setup_only:
        output.info(f"Next: `sidestep analyze --checkpoint-dir {paths.checkpoints} --dataset-dir {paths.dataset}`, "
                    f"or `sidestep demo {directory}` to run every step on it.")
        return
    from sidestep.cli.demo_run import run_demo_job

    run_demo_job(paths)


def _print_written(root: Path) -> None:
    """Every file under the demo folder, one line per folder, so the user knows what landed on their disk."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    output.info(f"Wrote {len(files)} files ({size / 1e6:.1f} MB) under {root}:")
    by_folder: dict[Path, list[str]] = {}
    for path in files:
        by_folder.setdefault(path.parent.relative_to(root), []).append(path.name)
    for folder, names in by_folder.items():
        output.info(f"  {folder}/  {', '.join(names)}")
