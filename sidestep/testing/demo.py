"""The built-in demo: a tiny real-architecture checkpoint and a generated dataset, no download needed.

The paths are a public contract: DIR/checkpoints/acestep-v15-base/{config.json, model.safetensors,
silence_latent.pt} and DIR/dataset/*.pt. The dataset is made the way users make theirs: synthesized
clips in DIR/audio/ are preprocessed with the tiny real-architecture VAE (DIR/checkpoints/vae) and text
encoder (DIR/checkpoints/Qwen3-Embedding-0.6B) and the model's condition encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidestep.testing.tiny import tiny_config, write_original_checkpoint
from sidestep.testing.tiny_audio import setup_demo_audio

if TYPE_CHECKING:
    from sidestep.data.preprocess import PreprocessConfig

__all__ = ["DemoPaths", "setup_demo", "demo_config", "demo_preprocess_config", "DEMO_MODEL"]

DEMO_MODEL = "base"


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    checkpoints: Path
    model_dir: Path
    dataset: Path
    audio: Path | None = None  # the synthesized clips the dataset was preprocessed from


def demo_config() -> dict[str, Any]:
    """The demo model's config.json: 4 layers, 64 wide (tests pin its weight names and shapes)."""
    return tiny_config(num_layers=4, hidden=64)


def setup_demo(root: Path, samples: int = 6, seed: int = 0) -> DemoPaths:
    """Write the demo checkpoint (original ACE-Step layout), audio clips, and the dataset preprocessed from them."""
    from sidestep.data.preprocess import preprocess_audio  # imports the encoders only when the demo is set up

    root = Path(root).expanduser().resolve()
    checkpoints = root / "checkpoints"
    config = demo_config()
    model_dir = write_original_checkpoint(checkpoints, config, seed=seed)
    audio = setup_demo_audio(root, count=samples, text_hidden_dim=config["text_hidden_dim"], seed=seed)
    paths = DemoPaths(root, checkpoints, model_dir, root / "dataset", audio)
    preprocess_audio(demo_preprocess_config(paths))
    return paths


def demo_preprocess_config(paths: DemoPaths) -> PreprocessConfig:
    """How the demo preprocesses DIR/audio into DIR/dataset: CPU, fp32, whole clips."""
    from sidestep.data.preprocess import PreprocessConfig
    from sidestep.models import resolve_runtime

    return PreprocessConfig(audio_dir=paths.audio or paths.root / "audio", output_dir=paths.dataset,
                            checkpoint_dir=paths.checkpoints, model=DEMO_MODEL,
                            runtime=resolve_runtime("cpu", "fp32", False))
