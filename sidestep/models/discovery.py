"""Find the DiT model folders under a checkpoint root, in either layout, and name their variant."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sidestep.errors import CheckpointError, ConfigError
from sidestep.models.variants import VARIANTS, Variant, folder_for, resolve_variant, variant_from_folder

__all__ = ["Layout", "ModelEntry", "check_config", "discover_models", "find_model", "read_config", "require_models"]

# Folders that sit beside the models in a checkpoint root and are never DiTs.
_SKIP_PREFIXES = ("vae", "qwen", "acestep-5hz", ".", "__")
# A fine-tune names its parent variant in config.json under one of these keys.
BASE_VARIANT_KEYS = ("base_variant", "sidestep_base_variant")


class Layout(str, Enum):
    ORIGINAL = "original"  # <model>/config.json + model.safetensors holding decoder.* and more
    DIFFUSERS = "diffusers"  # <model>/transformer/{config.json, diffusion_pytorch_model.safetensors}


@dataclass(frozen=True)
class ModelEntry:
    name: str  # folder name, e.g. acestep-v15-base
    path: Path
    layout: Layout
    official: bool
    variant: str | None  # official variant it is or descends from; None when unknown
    config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def label(self) -> str:
        kind = "official" if self.official else f"fine-tune of {self.variant or 'unknown'}"
        return f"{self.name} ({kind}, {self.layout.value} layout)"

    @property
    def defaults(self) -> Variant:
        """The training defaults this checkpoint implies (turbo or not, timestep distribution)."""
        return resolve_variant(self.variant, self.config)

    @property
    def is_turbo(self) -> bool:
        return self.defaults.is_turbo

    @property
    def transformer_dir(self) -> Path:
        return self.path / "transformer" if self.layout is Layout.DIFFUSERS else self.path


def read_config(path: Path) -> dict[str, Any]:
    """Read a config.json, as a CheckpointError naming the file when it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise CheckpointError(f"{path}: cannot read the model config ({str(err)[:120] or type(err).__name__}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the model config is not a JSON object.")
    return data


def _is_dit_config(cfg: dict[str, Any]) -> bool:
    if cfg.get("_class_name") == "AceStepTransformer1DModel":
        return True
    return "num_hidden_layers" in cfg and "hidden_size" in cfg and (
        "audio_acoustic_hidden_dim" in cfg or "in_channels" in cfg or "model_version" in cfg
    )


def _probe(folder: Path) -> ModelEntry | None:
    for layout, cfg_path in ((Layout.DIFFUSERS, folder / "transformer" / "config.json"),
                             (Layout.ORIGINAL, folder / "config.json")):
        if cfg_path.is_file():
            cfg = read_config(cfg_path)
            if not _is_dit_config(cfg):
                return None
            official_variant = variant_from_folder(folder.name.removesuffix("-diffusers"))
            return ModelEntry(folder.name, folder, layout, official_variant is not None,
                              official_variant or _declared_variant(cfg), cfg)
    return None


def _declared_variant(cfg: dict[str, Any]) -> str | None:
    for key in BASE_VARIANT_KEYS:
        if cfg.get(key) in VARIANTS:
            return cfg[key]
    return None


def discover_models(root: Path) -> list[ModelEntry]:
    """Every DiT model folder directly under `root` (or `root` itself), official ones first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"Checkpoint folder {root} does not exist or is not a folder.")
    entries = [e for e in [_probe(root)] if e]
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.lower().startswith(_SKIP_PREFIXES):
            entry = _probe(child)
            if entry:
                entries.append(entry)
    return sorted(entries, key=lambda e: (not e.official, e.name))


def require_models(root: Path) -> list[ModelEntry]:
    """`discover_models`, refusing a folder that holds none: what a checkpoint folder setting must pass."""
    entries = discover_models(root)
    if not entries:
        raise CheckpointError(f"No ACE-Step model folder (e.g. acestep-v15-base/) found in {Path(root).expanduser()}.")
    return entries


def find_model(root: Path, model: str, base_variant: str | None = None) -> ModelEntry:
    """Resolve `--model` (a variant name or folder name) under `root`; the variant must be known."""
    root = Path(root).expanduser()
    candidate = root / folder_for(model)
    entry = _probe(candidate) if candidate.is_dir() else None
    if entry is None and (root / model).is_dir():
        entry = _probe(root / model)
    if entry is None and _probe(root) is not None and model in (root.name, folder_for(root.name)):
        entry = _probe(root)
    if entry is None:
        found = ", ".join(e.name for e in discover_models(root)) or "none"
        raise CheckpointError(f"No model {model!r} under {root} (looked for {candidate.name}/); models found: {found}.")
    if base_variant is not None:
        if base_variant not in VARIANTS:
            raise ConfigError(f"--base-variant {base_variant!r} is not one of: {', '.join(VARIANTS)}.")
        entry = ModelEntry(entry.name, entry.path, entry.layout, entry.official, base_variant, entry.config)
    if entry.variant is None:
        raise ConfigError(
            f"{entry.name} is a fine-tune whose parent variant is unknown; pass --base-variant "
            f"(one of {', '.join(VARIANTS)}) or add \"base_variant\" to its config.json."
        )
    check_config(entry.config, entry.transformer_dir / "config.json")
    return entry


# The counts and widths of the DiT a config.json describes, with a bound no real model comes near: a hostile or
# mistyped file must fail here, in one sentence, not while building the model or allocating its weights.
_SIZES = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024, "num_attention_heads": 1024,
          "num_key_value_heads": 1024, "head_dim": 4096, "in_channels": 1 << 14, "audio_acoustic_hidden_dim": 1 << 13,
          "patch_size": 64}
_OPTIONAL_SIZES = {"encoder_hidden_size": 1 << 16, "sliding_window": 1 << 24}


def check_config(cfg: dict[str, Any], path: Path) -> None:
    """The architecture numbers of a DiT config.json: whole, positive, bounded and consistent."""
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; fix the file or use another model folder.")

    for key, bound in (_SIZES | _OPTIONAL_SIZES).items():
        value = cfg.get(key)
        if value is None and key in _OPTIONAL_SIZES:
            continue
        if key == "head_dim" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"'{key}' is {json.dumps(value)[:40]}, not a whole number")
        if not 0 < value <= bound:
            raise fail(f"'{key}' is {str(value)[:40]}, outside 1..{bound}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise fail(f"'num_attention_heads' {cfg['num_attention_heads']} is not a multiple of 'num_key_value_heads' "
                   f"{cfg['num_key_value_heads']}")
    if cfg["in_channels"] <= cfg["audio_acoustic_hidden_dim"]:
        raise fail(f"'in_channels' {cfg['in_channels']} must exceed 'audio_acoustic_hidden_dim' "
                   f"{cfg['audio_acoustic_hidden_dim']}")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != cfg["num_hidden_layers"]):
        raise fail(f"'layer_types' must list one type for each of the {cfg['num_hidden_layers']} layers")
    for key in ("rope_theta", "rms_norm_eps"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            raise fail(f"'{key}' is {json.dumps(value)[:40]}, not a finite positive number")
