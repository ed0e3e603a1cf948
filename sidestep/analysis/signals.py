"""Post-processing of the analysis statistics into per-module signals (docs/algorithm.md §2 and
docs/data-awareness.md).

- need: an unbiased estimate of ||E G||² (how far, to first order, the data wants a module's weight to move)
  and of its spectrum, from the per-batch gradient sketches; the noise of single batches is removed;
- data rank: how many directions the data pushes a module in, from the singular values of its gradient sketch;
- weight effective rank: the reference's data-independent spectral factor, from the pretrained weight;
- low confidence: modules whose cross-run std exceeds half their mean Fisher score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "NeedEstimate",
    "need_estimate",
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


@dataclass(frozen=True)
class NeedEstimate:
    """What the data asks of one module, with the per-batch noise removed.

    With Z_i the sketch of batch i's gradient and Z = Σ Z_i over n batches, ||Z||² − Σ||Z_i||² keeps only the
    cross terms Σ_{i≠j} <Z_i, Z_j>, whose expectation is n(n−1)·||E Z_i||²: the squared mean gradient, free of
    the noise term that dominates every second moment at a pretrained model. The same on the k × k Gram
    matrices gives the need's spectrum: eigenvalues λ_1 ≥ λ_2 ≥ ... (energy of the need per direction; the
    small ones can be negative, which means noise).

    Args:
        total: unbiased ||E G||² (can be slightly negative when a module has no need at all).
        spectrum: the need's eigenvalues, largest first (length k).
        noise: mean per-batch ||G||² seen through the sketch (the second moment, need + noise).
        batches: n.
    """

    total: float
    spectrum: tuple[float, ...]
    noise: float
    batches: int

    def beyond(self, rank: int) -> float:
        """Need energy outside the `rank` strongest directions, negative eigenvalues counted as 0."""
        return float(sum(max(v, 0.0) for v in self.spectrum[rank:]))

    def within(self, rank: int) -> float:
        """Need energy inside the `rank` strongest directions (what a rank-`rank` update can follow)."""
        return float(sum(max(v, 0.0) for v in self.spectrum[:rank]))


def need_estimate(sketch: torch.Tensor, gram: torch.Tensor, batch_sq: float, batches: int) -> NeedEstimate:
    """The unbiased need of one module from Z = Σ Z_i (in × k), Σ Z_iᵀZ_i (k × k) and Σ ||Z_i||² over n batches."""
    z = sketch.detach().double()
    if batches < 2:
        return NeedEstimate(0.0, tuple(0.0 for _ in range(z.shape[1])), batch_sq / max(batches, 1), batches)
    pairs = batches * (batches - 1)
    cross = (z.t() @ z - gram.detach().double()) / pairs
    spectrum = torch.linalg.eigvalsh((cross + cross.t()) / 2).flip(0).cpu().numpy()
    total = (float(z.square().sum()) - batch_sq) / pairs
    return NeedEstimate(total, tuple(float(v) for v in spectrum), batch_sq / batches, batches)
