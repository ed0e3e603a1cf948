"""Names every layer shares, kept in this import-free module so torch-free code (maps, CLI help) can use them."""

from __future__ import annotations

__all__ = ["DECODER_PREFIX", "ENCODER_PREFIX"]

# The DiT's prefix inside ACE-Step's full-model checkpoint and in the reference tool's `modules[].name`.
DECODER_PREFIX = "decoder."
# The condition encoder's prefix in that checkpoint.
ENCODER_PREFIX = "encoder."
