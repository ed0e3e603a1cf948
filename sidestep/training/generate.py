"""`generate()`: render prompts with the base model or a saved adapter (any of our formats) into WAV + JSON.

Everything that can be wrong with the input (prompts, durations, settings, the adapter, the checkpoint's
VAE and text encoder, existing outputs) is checked before any weight is loaded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft.utils.other import get_pattern_key

from sidestep import __version__
from sidestep.data.encoders import load_encoders, require_encoder_files
from sidestep.errors import CheckpointError, ConfigError
from sidestep.fileio import write_json_atomic
from sidestep.generation import Renderer, RenderSettings, SamplePrompt, resolve_settings, write_wav
from sidestep.models import Runtime, load_model, variant_defaults
from sidestep.models.select import ModelChoice
from sidestep.models.variants import with_config
from sidestep.training import saving
from sidestep.training.adapters import AdapterPlan, attach_adapter, resolve_targets
from sidestep.training.config import AdapterKind
from sidestep.training.export import adapter_source, read_lora

__all__ = ["SavedAdapter", "read_saved_adapter", "attach_saved_adapter", "GenerateConfig", "Rendering",
           "RenderedClip", "GenerateOutcome", "generate", "MAX_STRENGTH"]

MAX_STRENGTH = 2.0


# ---- saved adapters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter read from disk, as the plan `attach_adapter` injects and the tensors it then loads."""

    path: Path
    plan: AdapterPlan
    tensors: dict[str, torch.Tensor] = field(repr=False)  # ACE-Step file keys (`base_model.model.<original>...`)


def read_saved_adapter(src: Path, num_layers: int) -> SavedAdapter:
    """An adapter folder, a training output (its final/) or an exported diffusers/ComfyUI file; no model needed."""
    path = adapter_source(Path(src))
    if path.is_dir():
        files = saving.read_adapter_dir(path)
        return SavedAdapter(path, _plan_from_config(files.config, num_layers, path), files.tensors)
    lora = read_lora(path)  # detects diffusers vs ComfyUI keys; a CheckpointError for anything else
    tensors = {}
    for name in lora.down:
        tensors[f"{saving.PEFT_PREFIX}{name}.lora_A.weight"] = lora.down[name]
        tensors[f"{saving.PEFT_PREFIX}{name}.lora_B.weight"] = lora.up[name]
    plan = lora.plan()
    _check_layers(plan, num_layers, path)
    return SavedAdapter(path, plan, tensors)


def attach_saved_adapter(transformer: torch.nn.Module, adapter: SavedAdapter) -> None:
    """Inject the adapter's layout and load its weights strictly; nothing of it trains."""
    attach_adapter(transformer, adapter.plan)
    saving.load_adapter_weights(transformer, adapter.tensors)
    transformer.requires_grad_(False)


def _plan_from_config(cfg: dict[str, Any], num_layers: int, src: Path) -> AdapterPlan:
    """The per-module ranks and alphas an adapter_config.json means, with peft's own pattern rule."""
    peft_type = cfg.get("peft_type")
    kinds = {"LORA": AdapterKind.DORA if cfg.get("use_dora") else AdapterKind.LORA, "LOKR": AdapterKind.LOKR,
             "LOHA": AdapterKind.LOHA}
    if peft_type not in kinds:
        raise ConfigError(f"{src} holds a {peft_type} adapter; sidestep renders LoRA, DoRA, LoKr and LoHa.")
    targets = cfg.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    try:
        names = resolve_targets(tuple(targets), num_layers)
    except ConfigError:
        raise CheckpointError(f"{src}: its target_modules {targets[:3]} do not match this {num_layers}-layer "
                              "model; pick the model it was trained on (--model).") from None
    rank = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", cfg.get("alpha", rank)) or rank)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    ranks = {n: int(rank_pattern.get(get_pattern_key(list(rank_pattern), n), rank)) for n in names}
    alphas = {n: float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), n), alpha)) for n in names}
    dropout = float(cfg.get("lora_dropout", cfg.get("rank_dropout", 0.0)) or 0.0)
    return AdapterPlan(kinds[peft_type], ranks, alphas, dropout, rank, alpha, adaptive=bool(rank_pattern))


def _check_layers(plan: AdapterPlan, num_layers: int, src: Path) -> None:
    beyond = [n for n in plan.ranks if int(n.split(".")[1]) >= num_layers]
    if beyond:
        raise CheckpointError(f"{src} adapts {beyond[0]}, but this model has only {num_layers} layers; "
                              "pick the model it was trained on (--model).")


# ---- the run -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateConfig:
    """One `sidestep generate`; `steps`/`guidance`/`shift` None take the variant's defaults."""

    prompts: tuple[SamplePrompt, ...]
    out_dir: Path
    adapter: Path | None = None
    strength: float = 1.0
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    compare: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not self.prompts:
            raise ConfigError("There is nothing to render: give --prompt or a --prompts file with at least one entry.")
        names = [p.name for p in self.prompts]
        if len(set(names)) != len(names):
            raise ConfigError(f"Two prompts share the name {_first_duplicate(names)!r}; give each a different name.")
        if not math.isfinite(self.strength) or not 0.0 <= self.strength <= MAX_STRENGTH:
            raise ConfigError(f"--strength must be from 0 (the base model) to {MAX_STRENGTH:g}, got {self.strength!r}.")
        if self.adapter is None and (self.compare or self.strength != 1.0):
            flag = "--compare" if self.compare else "--strength"
            raise ConfigError(f"{flag} needs --adapter: the adapter folder or exported file to render with.")

    def files(self, prompt: SamplePrompt) -> dict[str, Path]:
        """label -> WAV path: `NAME.wav`, or with --compare `NAME.adapter.wav` beside `NAME.base.wav`."""
        if self.compare:
            return {"adapter": self.out_dir / f"{prompt.name}.adapter.wav", "base": self.out_dir / f"{prompt.name}.base.wav"}
        return {"adapter" if self.adapter else "base": self.out_dir / f"{prompt.name}.wav"}

    def settings_file(self, prompt: SamplePrompt) -> Path:
        return self.out_dir / f"{prompt.name}.json"


@dataclass(frozen=True)
class Rendering:
    """Progress: clip `index` of `total` (`label` base or adapter) is being rendered."""

    index: int
    total: int
    name: str
    label: str


@dataclass(frozen=True)
class RenderedClip:
    name: str
    files: dict[str, Path]
    settings_file: Path
    seconds: float


@dataclass(frozen=True)
class GenerateOutcome:
    out_dir: Path
    clips: tuple[RenderedClip, ...]
    settings: RenderSettings
    model: str
    sample_rate: int
    adapter: Path | None

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "model": self.model, "adapter": None if self.adapter is None else str(self.adapter),
                "sample_rate": self.sample_rate, **self.settings.to_json(),
                "clips": [{"name": c.name, "files": {k: str(v) for k, v in c.files.items()},
                           "settings": str(c.settings_file), "render_seconds": round(c.seconds, 3)} for c in self.clips]}


def generate(config: GenerateConfig, choice: ModelChoice, runtime: Runtime,
             on_event: Callable[[Rendering], None] = lambda event: None) -> GenerateOutcome:
    """Render every prompt of `config` (and, with --compare, the base model too) into `config.out_dir`."""
    # ---- preflight: settings, checkpoint files, the adapter and the outputs, before any weight loads
    entry = choice.entry
    variant = with_config(variant_defaults(entry.variant or "base"), entry.config)
    settings = resolve_settings(variant, config.steps, config.guidance, config.shift)
    require_encoder_files(entry, choice.checkpoint_dir)
    adapter = read_saved_adapter(config.adapter, int(entry.config["num_hidden_layers"])) if config.adapter else None
    if not config.overwrite:
        for prompt in config.prompts:
            for path in (*config.files(prompt).values(), config.settings_file(prompt)):
                if path.exists():
                    raise ConfigError(f"{path} already exists; pass --overwrite to replace it or choose another --out.")

    # ---- models: the transformer (with the adapter), then the VAE, text and condition encoders
    loaded = load_model(entry, runtime)
    if adapter is not None:
        attach_saved_adapter(loaded.transformer, adapter)
    encoders = load_encoders(entry, choice.checkpoint_dir, runtime)
    renderer = Renderer(loaded.transformer, encoders, variant)

    # ---- render each prompt: the adapter at --strength, and the base model beside it with --compare
    clips = []
    labels = {"adapter": config.strength, "base": 0.0}
    with renderer.on_device(runtime.device, runtime.dtype, park=False):
        for index, prompt in enumerate(config.prompts):
            started = time.perf_counter()
            files = config.files(prompt)
            for label, path in files.items():
                on_event(Rendering(index, len(config.prompts), prompt.name, label))
                audio = renderer.render(prompt, settings, labels[label] if adapter is not None else None)
                write_wav(path, audio, renderer.sample_rate)
            record = {"prompt": prompt.to_json(), "settings": settings.to_json(), "model": entry.name,
                      "variant": variant.name, "adapter": None if adapter is None else str(adapter.path),
                      "strength": config.strength if adapter is not None else None,
                      "files": {k: v.name for k, v in files.items()}, "sample_rate": renderer.sample_rate,
                      "precision": runtime.precision, "sidestep_version": __version__}
            write_json_atomic(config.settings_file(prompt), record)
            clips.append(RenderedClip(prompt.name, files, config.settings_file(prompt), time.perf_counter() - started))
    return GenerateOutcome(config.out_dir, tuple(clips), settings, entry.name, renderer.sample_rate,
                           None if adapter is None else adapter.path)


def _first_duplicate(names: list[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return names[0]
