"""Post-processing of the analysis statistics into per-module signals (docs/algorithm.md §2).

- data rank: how many directions the data pushes a module in, from the singular values of its gradient sketch;
- weight effective rank: the reference's data-independent spectral factor, from the pretrained weight;
- low confidence: modules whose cross-run std exceeds half their mean Fisher score.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "DATA_RANK_ENERGY",
    "WEIGHT_RANK_ENERGY",
    "LOW_CONFIDENCE_RATIO",
    "energy_rank",
    "low_confidence",
    "singular_values",
    "weight_effective_rank",
]

DATA_RANK_ENERGY = 0.9  # rho of docs/algorithm.md §2
WEIGHT_RANK_ENERGY = 0.95  # the reference's spectral factor
LOW_CONFIDENCE_RATIO = 0.5


def energy_rank(values: Sequence[float] | np.ndarray, fraction: float) -> int:
    """The number of largest singular values whose squares hold `fraction` of the total energy; 0 without energy.

    Args:
        values: singular values (any order, >= 0).
        fraction: in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    energy = np.sort(np.asarray(values, dtype=np.float64).ravel() ** 2)[::-1]
    total = energy.sum()
    if not np.isfinite(total) or total <= 0:
        return 0
    cumulative = np.cumsum(energy) / total
    # A relative tolerance so that e.g. exactly 90% of the energy counts as reaching 0.9.
    return int(min(np.searchsorted(cumulative, fraction - 1e-12) + 1, energy.size))


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """Singular values of a 2-D tensor, computed in fp32 on its device, returned on the host."""
    return torch.linalg.svdvals(matrix.detach().float()).cpu().numpy().astype(np.float64)


def weight_effective_rank(weight: torch.Tensor, fraction: float = WEIGHT_RANK_ENERGY) -> int:
    """Singular values of a pretrained weight holding `fraction` (95%) of its energy."""
    return energy_rank(singular_values(weight), fraction)


def low_confidence(mean: Mapping[str, float], std: Mapping[str, float], ratio: float = LOW_CONFIDENCE_RATIO) -> list[str]:
    """Modules whose cross-run std is above `ratio` × their mean score, in the order of `mean`."""
    return [name for name, m in mean.items() if std.get(name, 0.0) > ratio * m]
