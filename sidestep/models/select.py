"""Pick the model a command runs on: flags > env > settings, and say where each choice came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidestep import settings
from sidestep.models.device import Runtime, on_this_process, resolve_runtime
from sidestep.models.discovery import ModelEntry, find_model

__all__ = ["ModelChoice", "choose_model", "choose_runtime"]


@dataclass(frozen=True)
class ModelChoice:
    entry: ModelEntry
    checkpoint_dir: Path
    sources: dict[str, str]  # setting -> where its value came from


def choose_model(checkpoint_dir: Path | None, model: str | None, base_variant: str | None = None) -> ModelChoice:
    """Resolve `--checkpoint-dir`/`--model` against the settings and find the model folder (no weights read)."""
    root = settings.require_checkpoint_dir(checkpoint_dir)
    name = settings.resolve("model", model)
    entry = find_model(Path(root.value), name.value, base_variant)
    return ModelChoice(entry, Path(root.value), {"checkpoint_dir": root.source, "model": name.source})


def choose_runtime(device: str | None, precision: str | None, gradient_checkpointing: bool | None = None) -> Runtime:
    """Device and precision from flags > env > settings > auto."""
    dev = settings.resolve("device", device).value
    prec = settings.resolve("precision", precision).value
    # Under torchrun / accelerate launch each process takes its own GPU (cuda:LOCAL_RANK).
    return on_this_process(resolve_runtime(dev, prec, gradient_checkpointing))
