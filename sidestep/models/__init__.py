"""Model layer: variants, checkpoint discovery, loading both layouts, name conversion, device choice."""

from sidestep.models.convert import diffusers_to_original, original_to_diffusers
from sidestep.models.device import Runtime, resolve_runtime
from sidestep.models.discovery import ModelEntry, discover_models, find_model
from sidestep.models.loading import LoadedModel, load_model
from sidestep.models.variants import Variant, variant_defaults

__all__ = [
    "LoadedModel",
    "ModelEntry",
    "Runtime",
    "Variant",
    "diffusers_to_original",
    "discover_models",
    "find_model",
    "load_model",
    "original_to_diffusers",
    "resolve_runtime",
    "variant_defaults",
]
