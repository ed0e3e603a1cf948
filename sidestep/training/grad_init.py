"""`--init gradient`: start every LoRA A from the analysis' top gradient directions (docs/algorithm.md §7).

peft starts A ~ kaiming_uniform(a=√5), B = 0, so the first update is the mean gradient projected on a random
r-dimensional input subspace. Here A's rows are the first r_m rows of the stored basis Q_mᵀ (the top right singular
subspace of the mean gradient), scaled to the Frobenius norm peft's init has on average, and B stays 0: the
model's output at step 0 is the base model's, the learning rate keeps its meaning, and the saved adapter is
an ordinary LoRA of the same ranks.

`resolve_init` runs in preflight: a missing, stale or too-narrow init file falls back to the default init with
one notice; `--init gradient` with neither a map nor an init file is an error saying how to make one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from sidestep.analysis.fisher_map import MAP_FILENAME, read_map
from sidestep.analysis.init_file import INIT_FILENAME, InitFileError, read_init
from sidestep.analysis.modules import ModuleShape
from sidestep.errors import ConfigError, MapError
from sidestep.models.convert import original_to_diffusers
from sidestep.training.config import InitMode, TrainConfig

__all__ = ["InitPlan", "apply_gradient_init", "default_a_norm", "resolve_init"]

_FALLBACK = "training starts from the default init instead"


@dataclass(frozen=True)
class InitPlan:
    """The init this run really uses: `mode` is DEFAULT after a fallback; `bases` are [k_m, in] fp16, original names."""

    mode: InitMode
    source: Path | None = None
    sha256: str | None = None
    bases: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    notice: str | None = None  # the one-line fallback warning, or None
    level: str = "warning"

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode.value, "source": None if self.source is None else str(self.source),
                "sha256": self.sha256}


def default_a_norm(rank: int) -> float:
    """E||A||_F² of peft's default A ([rank, in], kaiming_uniform a=√5: entries U(±1/√in)) is rank/3, for any `in`.

    Returns √(rank/3), the norm gradient init gives A (a tight estimate of E||A||_F for rank·in ≫ 1).
    """
    return math.sqrt(rank / 3.0)


def resolve_init(config: TrainConfig, ranks: Mapping[str, int], shapes: Mapping[str, ModuleShape]) -> InitPlan:
    """Find and check the init bases for `ranks` (original names → rank); never loads the model.

    The map in the dataset folder (used or ignored) names the file and its hash; without a map, a
    fisher_init.safetensors beside the data is taken as is (hash unchecked).
    """
    if config.init is not InitMode.GRADIENT:
        return InitPlan(InitMode.DEFAULT)
    map_path = config.dataset_dir / MAP_FILENAME
    init_path = config.dataset_dir / INIT_FILENAME
    if not map_path.is_file() and not init_path.is_file():
        raise ConfigError(f"--init gradient needs the init bases of Preprocessing++, but {config.dataset_dir} has "
                          f"neither {MAP_FILENAME} nor {INIT_FILENAME}: run `sidestep analyze --dataset-dir "
                          f"{config.dataset_dir}` first, or use --init default.")
    expected, k = None, None
    if map_path.is_file():
        try:
            ref = read_map(map_path).init
        except MapError as err:  # reached only with --ignore-fisher-map; otherwise planning already failed
            return _fallback(f"{err}".rstrip(".") + f"; {_FALLBACK}.")
        if ref is None:
            return _fallback(f"{map_path.name} records no init bases (analysed with --no-init or by an older "
                             f"version); rerun `sidestep analyze` for them; {_FALLBACK}.")
        init_path, expected, k = map_path.parent / ref.file, ref.sha256, ref.k
    limit = _max_init_bytes(shapes, k)
    if init_path.is_file() and init_path.stat().st_size > limit:
        return _fallback(f"--init gradient: {init_path} is {init_path.stat().st_size:,} bytes, more than any init file "
                         f"for this model can be ({limit:,}); rerun `sidestep analyze` to remake it; {_FALLBACK}.")
    try:
        bases = read_init(init_path, expected, ranks)
    except InitFileError as err:
        return _fallback(f"--init gradient: {str(err).rstrip('.')}; {_FALLBACK}.")
    problem = _mismatch(bases, ranks, shapes)
    if problem is not None:
        return _fallback(f"--init gradient: {init_path} {problem}; rerun `sidestep analyze` to remake it; {_FALLBACK}.")
    note = f"Gradient-aligned init: LoRA A starts from the top gradient directions in {init_path.name}."
    return InitPlan(InitMode.GRADIENT, init_path, expected, {n: bases[n] for n in ranks}, note, "info")


def apply_gradient_init(transformer: torch.nn.Module, ranks: Mapping[str, int], bases: Mapping[str, torch.Tensor],
                        adapter_name: str = "default") -> None:
    """Set each LoRA A (after peft's init) to √(r/3)·(first r orthonormal basis rows); B is peft's zero."""
    modules = dict(transformer.named_modules())
    for name, rank in ranks.items():
        layer = modules[original_to_diffusers(name)]
        weight = layer.lora_A[adapter_name].weight  # [rank, in]
        rows = _orthonormal_rows(bases[name][:rank])
        with torch.no_grad():
            weight.copy_((rows * (default_a_norm(rank) / math.sqrt(rank))).to(weight.dtype))
            if bool(layer.lora_B[adapter_name].weight.any()):
                raise ConfigError(f"Internal check failed: LoRA B of {name} is not zero at init.")


# ---- helpers ---------------------------------------------------------------------------------------


def _fallback(message: str) -> InitPlan:
    return InitPlan(InitMode.DEFAULT, notice=message)


def _max_init_bytes(shapes: Mapping[str, ModuleShape], k: int | None) -> int:
    """The size of an init file holding a full [min(k, in, out), in] fp16 basis for every module, plus its header."""
    widest = max((max(s.in_features, s.out_features) for s in shapes.values()), default=0)
    rows = widest if k is None else k
    return sum(2 * min(rows, s.in_features, s.out_features) * s.in_features + 256 for s in shapes.values()) + (1 << 16)


def _mismatch(bases: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
              shapes: Mapping[str, ModuleShape]) -> str | None:
    """Why the stored bases cannot initialise these modules (another model, or fewer rows than the rank)."""
    for name, rank in ranks.items():
        basis, shape = bases[name], shapes[name]
        if basis.ndim != 2 or basis.shape[1] != shape.in_features:
            return (f"holds a {tuple(basis.shape)} basis for {name}, whose input has {shape.in_features} features "
                    "(made for another model)")
        if basis.shape[0] < rank:
            return (f"holds {basis.shape[0]} directions for {name} but its rank is {rank} (analyse with a larger "
                    "--rank-max)")
    return None


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """Undo fp16 rounding: QR in float64 gives orthonormal rows spanning the same space, in the same order and signs."""
    q, r = torch.linalg.qr(rows.to(torch.float64).t())
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).t()
