"""Tiny models of the real ACE-Step architecture and tiny real-format datasets, for tests, demo and benches."""

from sidestep.testing.tiny import (
    TINY_CONFIG,
    build_tiny_transformer,
    tiny_config,
    write_dataset,
    write_diffusers_checkpoint,
    write_original_checkpoint,
)

__all__ = [
    "TINY_CONFIG",
    "build_tiny_transformer",
    "tiny_config",
    "write_dataset",
    "write_diffusers_checkpoint",
    "write_original_checkpoint",
]
