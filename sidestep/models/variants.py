"""The official ACE-Step 1.5 variants and the training defaults each one implies."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from sidestep.errors import ConfigError

__all__ = ["Variant", "VARIANTS", "variant_defaults", "folder_for", "variant_from_folder", "with_config",
           "resolve_variant"]

# Turbo 8-step schedule at shift 3 (docs/checkpoints.md, Variants); t = 1 is pure noise.
TURBO_SHIFT3_TIMESTEPS: tuple[float, ...] = (1.0, 0.9545454545, 0.9, 0.8333333333, 0.75, 0.6428571429, 0.5, 0.3)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str  # turbo, base, sft, xl-turbo, xl-base, xl-sft
    is_turbo: bool
    timestep_mu: float = -0.4
    timestep_sigma: float = 1.0
    data_proportion: float = 0.5
    shift: float = 1.0
    inference_steps: int = 50

    @property
    def is_xl(self) -> bool:
        return self.name.startswith("xl-")

    @property
    def folder(self) -> str:
        return folder_for(self.name)

    @property
    def timestep_params(self) -> dict[str, float]:
        return {"mu": self.timestep_mu, "sigma": self.timestep_sigma, "data_proportion": self.data_proportion}


# Turbo is distilled for 8 steps at shift 3 without guidance (ACE-Step's own defaults).
_TURBO = dict(is_turbo=True, shift=3.0, inference_steps=8)
_PLAIN = dict(is_turbo=False, shift=1.0, inference_steps=50)
VARIANTS: dict[str, Variant] = {
    "turbo": Variant("turbo", **_TURBO),
    "base": Variant("base", **_PLAIN),
    "sft": Variant("sft", **_PLAIN),
    "xl-turbo": Variant("xl-turbo", **_TURBO),
    "xl-base": Variant("xl-base", **_PLAIN),
    "xl-sft": Variant("xl-sft", **_PLAIN),
}
_FOLDER_PREFIX = "acestep-v15-"


def variant_defaults(name: str) -> Variant:
    """The built-in defaults of an official variant; ConfigError naming the valid ones otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        valid = ", ".join(VARIANTS)
        raise ConfigError(f"Unknown model variant {name!r}; expected one of: {valid}.") from None


def folder_for(name: str) -> str:
    """`base` -> `acestep-v15-base`; any other name is taken as a literal folder (a fine-tune)."""
    return _FOLDER_PREFIX + name if name in VARIANTS else name


def variant_from_folder(folder: str) -> str | None:
    """`acestep-v15-xl-base` -> `xl-base`; None for names that are not an official variant folder."""
    if not folder.startswith(_FOLDER_PREFIX):
        return None
    rest = folder[len(_FOLDER_PREFIX) :]
    if rest in VARIANTS:
        return rest
    # Official sub-variants such as acestep-v15-turbo-shift3 descend from the longest matching name.
    for name in sorted(VARIANTS, key=len, reverse=True):
        if rest.startswith(name + "-"):
            return name
    return None


def with_config(variant: Variant, config: Mapping[str, Any]) -> Variant:
    """Values in the checkpoint's config.json win over the built-in defaults (`is_turbo` brings turbo's sampling)."""
    overrides: dict[str, Any] = {}
    for field in ("timestep_mu", "timestep_sigma", "data_proportion"):
        if config.get(field) is not None:
            overrides[field] = float(config[field])
    if config.get("is_turbo") is not None:
        overrides.update(_TURBO if bool(config["is_turbo"]) else _PLAIN)
    return replace(variant, **overrides)


def resolve_variant(name: str | None, config: Mapping[str, Any]) -> Variant:
    """How a checkpoint trains: its (parent) variant's defaults, `base` when unknown, overridden by its config.json.

    The one answer to "is this model turbo?" (and to its timestep distribution) for every command and the wizard.
    """
    return with_config(variant_defaults(name or "base"), config)
