"""Every shared command-line option, defined once: commands annotate parameters with these aliases.

Keep this a flat list. Defaults that come from settings are `None` here and resolved by
`sidestep.settings.resolve`, which also reports where each value came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

CheckpointDirOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", help="ACE-Step checkpoint folder (default: from settings).", show_default=False),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model variant or folder name: turbo, base, sft, xl-base, ... (default: from settings).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="Compute device: auto, cpu, cuda, cuda:N or mps (default: from settings).", show_default=False
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision", help="Precision: auto, bf16, fp16 or fp32 (default: from settings).", show_default=False
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same result.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Answer yes to every confirmation.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, nothing else there.")]
BaseVariantOpt = Annotated[
    str | None,
    typer.Option("--base-variant", help="For a fine-tune: the official variant it descends from (turbo, base, sft, ...).",
                 show_default=False),
]
