"""fisher_init.safetensors: the gradient-aligned LoRA init bases that analysis writes beside the map (docs/algorithm.md §7).

For every analysed module m (ORIGINAL name, `layers.3.self_attn.q_proj`) the file holds Q_mᵀ, a `[k_m, in]`
fp16 matrix whose rows are an orthonormal basis of the top right singular subspace of the mean gradient,
best direction first: Q_m = top-k_m left singular vectors of the input-side sketch Z_m = Σ Gᵀ Ψ_m (in × k_m,
k_m = min(k, in, out)). Training takes the first r_m rows as the LoRA A of a rank-r_m module. The map records
the file's name, sha256, k and seed (`FisherMap.init`), so a stale or swapped file is detected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sidestep.analysis.fisher_map import MAP_FILENAME, InitRef
from sidestep.analysis.modules import module_sort_key
from sidestep.errors import MapError
from sidestep.fileio import backup_existing, write_bytes_atomic

__all__ = ["INIT_FILENAME", "InitFileError", "init_bases", "init_path_for", "read_init", "write_init"]

INIT_FILENAME = "fisher_init.safetensors"
INIT_FORMAT = "sidestep-init-1"
_REMAKE = "rerun `sidestep analyze` to remake it"


class InitFileError(MapError):
    """A missing, unreadable, stale (hash) or incomplete fisher_init.safetensors."""


def init_path_for(map_path: Path) -> Path:
    """The init file that goes beside a map: fisher_init.safetensors next to fisher_map.json, else `<stem>_init…`."""
    map_path = Path(map_path)
    name = INIT_FILENAME if map_path.name == MAP_FILENAME else f"{map_path.stem}_init.safetensors"
    return map_path.with_name(name)


def init_bases(sketches: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Q_mᵀ (`[k_m, in]`, fp16, CPU) per module from its sketch Z_m (`in × k_m`).

    The SVD runs in float64 on the CPU (deterministic); each row's sign is fixed so that its largest-magnitude
    entry is positive, so the same sketch always gives the same bytes.
    """
    out: dict[str, torch.Tensor] = {}
    for name in sorted(sketches, key=module_sort_key):
        z = sketches[name].detach().to("cpu", torch.float64)
        u, _, _ = torch.linalg.svd(z, full_matrices=False)  # in × k_m, columns by falling singular value
        rows = u.t()
        pivot = rows.abs().argmax(dim=1, keepdim=True)
        signs = torch.sign(rows.gather(1, pivot))
        signs[signs == 0] = 1.0
        out[name] = (rows * signs).to(torch.float16).contiguous()
    return out


def write_init(path: Path, bases: Mapping[str, torch.Tensor], k: int, seed: int) -> tuple[InitRef, Path | None]:
    """Write the bases atomically (an existing file is kept as `.bak`); returns the map's reference and the .bak."""
    path = Path(path)
    tensors = {name: bases[name].to(torch.float16).contiguous() for name in sorted(bases, key=module_sort_key)}
    # One metadata key only: safetensors stores metadata in a hash map, so several keys come out in a random
    # order and the same bases would hash differently from one run to the next.
    meta = json.dumps({"format": INIT_FORMAT, "k": int(k), "naming": "original", "seed": int(seed)}, sort_keys=True)
    data = save_safetensors(tensors, metadata={"sidestep": meta})
    backup = backup_existing(path)
    write_bytes_atomic(path, data)
    return InitRef(file=path.name, sha256=hashlib.sha256(data).hexdigest(), k=int(k), seed=int(seed)), backup



def read_init(path: Path, expected_sha256: str | None,
              modules: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Load the bases (fp16, CPU, original names); every problem is one `InitFileError` naming the file.

    Args:
        expected_sha256: the hash the map recorded; None skips the check (an init file without a map).
        modules: names that must be present (the modules about to be initialised).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InitFileError(f"{path}: no such file; {_REMAKE}.") from None
    except OSError as err:
        raise InitFileError(f"{path}: cannot be read ({err.strerror or err}); {_REMAKE}.") from err
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise InitFileError(f"{path}: does not match the hash recorded in the map (stale or replaced); {_REMAKE}.")
    try:
        bases = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise InitFileError(f"{path}: is not a valid safetensors file ({err}); {_REMAKE}.") from None
    missing = [name for name in modules or () if name not in bases]
    if missing:
        raise InitFileError(f"{path}: has no basis for {missing[0]}" + (f" (and {len(missing) - 1} more)" if
                            len(missing) > 1 else "") + f"; {_REMAKE}.")
    return bases
