"""The adapter targets of the ACE-Step DiT, named as in the ORIGINAL checkpoints (no `decoder.` prefix).

A target is `layers.N.<group>.<projection>`, e.g. `layers.7.cross_attn.v_proj`; there are 11 per layer.
Everything here is plain string work so the allocation math and the map file never need torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch

from sidestep.errors import ConfigError
from sidestep.models.convert import original_to_diffusers
from sidestep.naming import DECODER_PREFIX

__all__ = [
    "DECODER_PREFIX",
    "PROJECTIONS",
    "Category",
    "ModuleShape",
    "check_rank_max_fits",
    "module_shapes",
    "category_of",
    "layer_of",
    "module_sort_key",
    "strip_decoder_prefix",
    "suffix_of",
    "targetable_modules",
]


class Category(str, Enum):
    """The three projection groups of a DiT layer (the reference's selection floor is per group)."""

    SELF_ATTN = "self_attn"
    CROSS_ATTN = "cross_attn"
    MLP = "mlp"


# Per-layer suffixes in the order the reference lists them; this order also sorts map entries.
PROJECTIONS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "cross_attn.q_proj",
    "cross_attn.k_proj",
    "cross_attn.v_proj",
    "cross_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_PROJECTION_INDEX = {suffix: i for i, suffix in enumerate(PROJECTIONS)}
_NAME = re.compile(r"layers\.(\d+)\.((?:self_attn|cross_attn|mlp)\.[a-z_]+)")


@dataclass(frozen=True, slots=True)
class ModuleShape:
    """The size of one targetable `nn.Linear` (weight is `out_features × in_features`)."""

    name: str
    in_features: int
    out_features: int

    def lora_params(self, rank: int) -> int:
        """Parameters of a rank-`rank` LoRA on this module: A is `rank × in`, B is `out × rank`."""
        return rank * (self.in_features + self.out_features)


def _parse(name: str) -> tuple[int, str]:
    match = _NAME.fullmatch(name)
    if match is None or match.group(2) not in _PROJECTION_INDEX:
        raise ValueError(f"{name!r} is not an ACE-Step target module name like 'layers.0.self_attn.q_proj'.")
    return int(match.group(1)), match.group(2)


def strip_decoder_prefix(name: str) -> str:
    """`decoder.layers.0.mlp.up_proj` -> `layers.0.mlp.up_proj`; other names come back unchanged."""
    return name[len(DECODER_PREFIX):] if name.startswith(DECODER_PREFIX) else name


def layer_of(name: str) -> int:
    """The layer index of a target name: `layers.11.mlp.up_proj` -> 11."""
    return _parse(name)[0]


def suffix_of(name: str) -> str:
    """The per-layer suffix of a target name: `layers.11.mlp.up_proj` -> `mlp.up_proj`."""
    return _parse(name)[1]


def category_of(name: str) -> Category:
    """The projection group of a target name: `layers.3.cross_attn.k_proj` -> `Category.CROSS_ATTN`."""
    return Category(_parse(name)[1].split(".", 1)[0])


def module_sort_key(name: str) -> tuple[int, int]:
    """Layer-major order (layer, then the position in PROJECTIONS), so layer 2 sorts before layer 10."""
    layer, suffix = _parse(name)
    return layer, _PROJECTION_INDEX[suffix]


def targetable_modules(num_layers: int) -> list[str]:
    """Every target of a `num_layers`-layer DiT in layer-major order: 11 × num_layers names."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}.")
    return [f"layers.{layer}.{suffix}" for layer in range(num_layers) for suffix in PROJECTIONS]


def module_shapes(transformer: torch.nn.Module) -> dict[str, ModuleShape]:
    """(in, out) of every targetable Linear, by original name (reads the base layer under an adapter)."""
    num_layers = int(transformer.config.num_hidden_layers)
    modules = dict(transformer.named_modules())
    out = {}
    for name in targetable_modules(num_layers):
        mod = modules[original_to_diffusers(name)]
        mod = getattr(mod, "base_layer", mod)
        out[name] = ModuleShape(name, int(mod.in_features), int(mod.out_features))
    return out


def check_rank_max_fits(rank_max: int, shapes: dict[str, ModuleShape]) -> None:
    """Every module must be able to hold `--rank-max` (rank at most min(in, out)), or a map could ask for more."""
    smallest = min(shapes.values(), key=lambda s: (min(s.in_features, s.out_features), s.name))
    limit = min(smallest.in_features, smallest.out_features)
    if rank_max > limit:
        raise ConfigError(f"--rank-max {rank_max} is more than {smallest.name} ({smallest.in_features}x"
                          f"{smallest.out_features}) can hold; pass --rank-max {limit} or less.")
