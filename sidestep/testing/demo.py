"""The built-in demo: a tiny real-architecture checkpoint and a generated dataset, no download needed.

The paths are a public contract: DIR/checkpoints/acestep-v15-base/{config.json, model.safetensors,
silence_latent.pt} and DIR/dataset/*.pt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidestep.testing.tiny import tiny_config, write_dataset, write_original_checkpoint

__all__ = ["DemoPaths", "setup_demo", "DEMO_MODEL"]

DEMO_MODEL = "base"


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    checkpoints: Path
    model_dir: Path
    dataset: Path


def setup_demo(root: Path, samples: int = 8, seed: int = 0) -> DemoPaths:
    """Write the demo checkpoint (original ACE-Step layout) and dataset under `root`."""
    root = Path(root).expanduser().resolve()
    checkpoints = root / "checkpoints"
    model_dir = write_original_checkpoint(checkpoints, tiny_config(num_layers=4, hidden=64), seed=seed)
    dataset = root / "dataset"
    write_dataset(dataset, count=samples, encoder_width=64, seed=seed)
    return DemoPaths(root, checkpoints, model_dir, dataset)
