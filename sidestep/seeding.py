"""Seeds derived from several integers, so every random draw can be tied to a position, never a shared stream."""

from __future__ import annotations

import numpy as np

__all__ = ["mix_seed"]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (e.g. seed, epoch, position): nearby inputs give unrelated streams.

    numpy's SeedSequence does the hashing; values are taken modulo 2**64, so negative seeds work too.
    """
    entropy = [int(v) & _MASK64 for v in values]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
