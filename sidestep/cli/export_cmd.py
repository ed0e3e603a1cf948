"""`sidestep export`: convert a trained adapter for ComfyUI, diffusers or ACE-Step/peft."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sidestep.display import output
from sidestep.cli.options import ExportFormatOpt, JsonOpt, OverwriteOpt
from sidestep.errors import ConfigError

_FORMATS = ("comfyui", "diffusers", "peft")

SrcArg = Annotated[Path, typer.Argument(help="A training output folder, an adapter folder, or an exported .safetensors.",
                                        show_default=False)]
DestArg = Annotated[Path, typer.Argument(help="Destination: a .safetensors file or a folder (peft: a folder).",
                                         show_default=False)]


def export(src: SrcArg, dest: DestArg, format: ExportFormatOpt = None, overwrite: OverwriteOpt = False,
           json: JsonOpt = False) -> None:
    """Write a trained adapter for ComfyUI (with alpha tensors), diffusers (with its metadata) or peft."""
    if format not in _FORMATS:
        shown = "missing" if format is None else repr(format)
        raise ConfigError(f"--format is {shown}; use comfyui, diffusers or peft.")
    from sidestep.training.export import export_adapter  # imports torch: keep `--help` fast

    result = export_adapter(src, dest, format, overwrite=overwrite)
    if json:
        output.emit_json({"path": str(result.path), "format": result.format.value, "modules": result.modules})
    else:
        output.success(f"Exported {result.modules} adapted modules as {result.format.value}: {result.path}")
