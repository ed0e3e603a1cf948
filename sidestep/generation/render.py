"""Render audio with diffusers' own `AceStepPipeline`, built from the components sidestep already loads.

We do not sample ourselves: the pipeline runs the text encoder, condition encoder, the flow-matching
schedule (with APG guidance on base/sft), the VAE decode and the loudness normalisation. What we add:

- prompt encodings are kept per distinct prompt (on the CPU), so the text encoder runs once per prompt
  and can stay off the accelerator while samples are rendered during training;
- the VAE, text and condition encoders can be parked on the CPU between renders (`on_device`);
- an adapter strength: 0 renders with the adapter switched off (exactly the base model), other values
  scale it through the pipeline's `attention_kwargs={"scale": s}`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from diffusers import AceStepPipeline, FlowMatchEulerDiscreteScheduler

from sidestep.data.encoders import Encoders
from sidestep.errors import ConfigError
from sidestep.fileio import atomic_path
from sidestep.generation.prompts import SamplePrompt
from sidestep.models.variants import Variant

__all__ = ["RenderSettings", "resolve_settings", "Renderer", "write_wav", "BASE_GUIDANCE"]

BASE_GUIDANCE = 7.0  # ACE-Step's default guidance scale for base/sft
_MAX_STEPS = 1000


@dataclass(frozen=True)
class RenderSettings:
    """The sampler settings shared by every clip of a run."""

    steps: int
    guidance: float  # <= 1 renders without guidance
    shift: float

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "guidance": self.guidance, "shift": self.shift}


def resolve_settings(variant: Variant, steps: int | None = None, guidance: float | None = None,
                     shift: float | None = None) -> RenderSettings:
    """Flags over the variant's defaults: turbo 8 steps, no guidance; base/sft more steps with guidance."""
    steps = variant.inference_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= _MAX_STEPS:
        raise ConfigError(f"--steps must be a whole number from 1 to {_MAX_STEPS}, got {steps!r}.")
    if guidance is None:
        guidance = 1.0 if variant.is_turbo else BASE_GUIDANCE
    elif not math.isfinite(guidance) or guidance < 0:
        raise ConfigError(f"--guidance must be a number >= 0 (1 or less turns guidance off), got {guidance!r}.")
    elif variant.is_turbo and guidance > 1.0:
        raise ConfigError(f"--guidance {guidance:g} does not apply to {variant.name}: turbo models have guidance "
                          "distilled in; leave --guidance out (or use 1).")
    shift = variant.shift if shift is None else shift
    if not math.isfinite(shift) or shift <= 0:
        raise ConfigError(f"--shift must be a number > 0, got {shift!r}.")
    return RenderSettings(steps, float(guidance), float(shift))


class _Pipeline(AceStepPipeline):
    """`AceStepPipeline` whose prompt encodings are computed once per distinct prompt and kept on the CPU."""

    def encode_prompt(self, prompt: Any, lyrics: Any, device: torch.device, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        cache = self.__dict__.setdefault("_sidestep_prompt_cache", {})
        key = repr((prompt, lyrics, sorted(kwargs.items())))
        if key not in cache:
            # On the text encoder's own device: during training it stays on the CPU.
            out = super().encode_prompt(prompt, lyrics, self.text_encoder.device, **kwargs)
            cache[key] = tuple(t.detach().to("cpu") for t in out)
        return tuple(t.to(device) for t in cache[key])


class Renderer:
    """One pipeline around a (possibly peft-injected) transformer and the loaded encoders."""

    def __init__(self, transformer: torch.nn.Module, encoders: Encoders, variant: Variant) -> None:
        self.transformer, self.encoders = transformer, encoders
        self.pipe = _Pipeline(vae=encoders.vae, text_encoder=encoders.text_encoder, tokenizer=encoders.tokenizer,
                              transformer=transformer, condition_encoder=encoders.condition_encoder,
                              scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0))
        # Our variant knows turbo from the folder name even when the transformer config does not say so.
        self.pipe.is_turbo = variant.is_turbo
        self.pipe.set_progress_bar_config(disable=True)  # library code never prints

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.sample_rate)

    @property
    def has_adapter(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    @contextlib.contextmanager
    def on_device(self, device: torch.device, dtype: torch.dtype, park: bool) -> Iterator[None]:
        """VAE and condition encoder on `device` (in the transformer's `dtype`, as the pipeline feeds them) while
        rendering; with `park` they go back to the CPU afterwards and the accelerator cache is emptied."""
        modules = (self.encoders.vae, self.encoders.condition_encoder)
        for module in modules:
            _move(module, device, dtype)
        try:
            yield
        finally:
            if park:
                for module in modules:
                    module.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    def render(self, prompt: SamplePrompt, settings: RenderSettings, strength: float | None = None) -> np.ndarray:
        """`[2, samples]` float32 audio at `sample_rate`. `strength` None: the transformer as it is; 0: its adapter
        switched off; otherwise the adapter scaled by `strength`."""
        kwargs = {"scale": float(strength)} if strength not in (None, 0.0, 1.0) else None
        with self._adapter_off(strength == 0.0), torch.no_grad():
            audio = self.pipe(
                prompt=prompt.prompt, lyrics=prompt.lyrics, audio_duration=prompt.duration,
                vocal_language=prompt.language, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                shift=settings.shift, generator=torch.Generator("cpu").manual_seed(prompt.seed), bpm=prompt.bpm,
                keyscale=prompt.keyscale, timesignature=prompt.timesignature, attention_kwargs=kwargs,
            ).audios
        return audio[0].float().cpu().numpy()

    @contextlib.contextmanager
    def _adapter_off(self, off: bool) -> Iterator[None]:
        if not (off and self.has_adapter):
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    from diffusers.utils import logging as dlog

    module.to(device)
    if module.dtype != dtype:
        # diffusers warns on every dtype cast of a model that has no fp32-only modules; nothing to say here.
        saved = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            module.to(dtype)
        finally:
            dlog.set_verbosity(saved)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """`[channels, samples]` audio as a 24-bit WAV, written atomically."""
    with atomic_path(Path(path)) as tmp:
        sf.write(str(tmp), np.ascontiguousarray(audio.T), sample_rate, format="WAV", subtype="PCM_24")
    return Path(path)
