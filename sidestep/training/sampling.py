"""Listen while you train: a loop callback that renders the same prompts with the same seeds every N steps.

Files go to `OUTPUT/samples/step-N/NAME.wav`; step 0 is the model before training (a fresh adapter is a
no-op), so every later step can be heard against it. Sampling must not change training: it runs in eval
mode under `torch.no_grad`, inside `torch.random.fork_rng` (the global RNG, which adapter dropout draws
from, is restored exactly), and puts the model back in train mode, so a run with samples ends with the
same adapter bit for bit as one without. Memory: the VAE, text and condition encoders are loaded at the
first render, on the CPU; the VAE and condition encoder visit the accelerator only while rendering, the
text encoder never does, and each prompt is encoded once for the whole run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sidestep.data.dataset import load_pt
from sidestep.data.encoders import Encoders, load_encoders, require_encoder_files
from sidestep.errors import DatasetError, SidestepError
from sidestep.generation import (PromptDefaults, Renderer, RenderSettings, SamplePrompt, make_prompt, read_prompts,
                                 resolve_settings, write_wav)
from sidestep.models import ModelEntry, Runtime
from sidestep.models.variants import Variant
from sidestep.training.config import TrainConfig
from sidestep.training.events import Notice, OnEvent, SamplesSaved
from sidestep.training.loop import LoopState

__all__ = ["SamplePlan", "plan_samples", "TrainingSampler", "samples_dir", "SAMPLES_DIR", "DEFAULT_SAMPLE_SECONDS"]

SAMPLES_DIR = "samples"
DEFAULT_SAMPLE_SECONDS = 30.0


@dataclass(frozen=True)
class SamplePlan:
    """What the sampler will render, settled in the preflight (before any weight loads)."""

    prompts: tuple[SamplePrompt, ...]
    settings: RenderSettings
    every: int


def samples_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / SAMPLES_DIR / f"step-{step}"


def plan_samples(config: TrainConfig, entry: ModelEntry, checkpoint_dir: Path, variant: Variant,
                 dataset_files: tuple[Path, ...]) -> SamplePlan | None:
    """The prompts file (or a prompt from the dataset's first caption), the settings, and the VAE/text encoder
    checked present; None when `--sample-every` is 0."""
    if not config.sample_every:
        return None
    require_encoder_files(entry, checkpoint_dir)
    defaults = PromptDefaults(duration=DEFAULT_SAMPLE_SECONDS, seed=config.seed)
    if config.sample_prompts is not None:
        prompts = read_prompts(config.sample_prompts, defaults)
    else:
        prompts = (_dataset_prompt(dataset_files[0], defaults),)
    return SamplePlan(prompts, resolve_settings(variant, config.sample_steps), config.sample_every)


def _dataset_prompt(path: Path, defaults: PromptDefaults) -> SamplePrompt:
    """A prompt made of a training sample's own caption, lyrics and metas (the first file, sorted)."""
    raw = load_pt(path, lambda err: DatasetError(f"{path}: cannot be read ({type(err).__name__})."), mmap=True)
    meta: dict[str, Any] = raw.get("metadata") if isinstance(raw, dict) and isinstance(raw.get("metadata"), dict) else {}
    entry: dict[str, Any] = {"name": "dataset-caption", "prompt": str(meta.get("caption") or "instrumental music")}
    if isinstance(meta.get("lyrics"), str) and meta["lyrics"].strip():
        entry["lyrics"] = meta["lyrics"]
    if isinstance(meta.get("bpm"), int) and 30 <= meta["bpm"] <= 300:
        entry["bpm"] = meta["bpm"]
    for key in ("keyscale", "timesignature"):
        if meta.get(key) not in (None, "", "N/A"):
            entry[key] = str(meta[key])
    duration = meta.get("duration")
    if isinstance(duration, (int, float)) and duration > 0:
        entry["duration"] = float(min(DEFAULT_SAMPLE_SECONDS, duration))
    return make_prompt(f"{path} (sample prompt)", entry, defaults)


class TrainingSampler:
    """The `LoopCallback` that renders `plan.prompts` at step 0, every `plan.every` steps and at the last step."""

    def __init__(self, transformer: torch.nn.Module, entry: ModelEntry, checkpoint_dir: Path, runtime: Runtime,
                 variant: Variant, plan: SamplePlan, total_steps: int, output_dir: Path, on_event: OnEvent) -> None:
        self.transformer, self.entry, self.checkpoint_dir = transformer, entry, Path(checkpoint_dir)
        self.runtime, self.variant, self.plan, self.total = runtime, variant, plan, total_steps
        self.output_dir, self.on_event = Path(output_dir), on_event
        self._renderer: Renderer | None = None
        self._failed = False

    def on_train_start(self, state: LoopState) -> None:
        if state.step == 0:  # a resumed run already has its earlier samples
            self._render_or_warn(0)

    def on_step_end(self, state: LoopState) -> None:
        if state.step % self.plan.every == 0 or state.step == self.total:
            self._render_or_warn(state.step)

    def on_train_end(self, state: LoopState) -> None:
        """The last step's samples are rendered by `on_step_end` (a Ctrl-C skips them)."""

    def _render_or_warn(self, step: int) -> None:
        """Samples are for listening: a failed render (say, out of GPU memory) stops the samples, never training."""
        if self._failed:
            return
        try:
            self.render(step)
        except (RuntimeError, OSError, ValueError, SidestepError) as err:
            self._failed = True
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            self.on_event(Notice(f"Samples at step {step} failed ({reason}); training goes on without samples."))

    def render(self, step: int) -> SamplesSaved:
        """Render every prompt at `step` into `samples/step-N/`, leaving the training state as it was."""
        started = time.perf_counter()
        device = self.runtime.device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        was_training = self.transformer.training
        files = []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            self.transformer.eval()
            try:
                renderer = self._load()
                with renderer.on_device(device, self.runtime.dtype, park=device.type != "cpu"):
                    for prompt in self.plan.prompts:
                        audio = renderer.render(prompt, self.plan.settings)
                        files.append(write_wav(samples_dir(self.output_dir, step) / f"{prompt.name}.wav", audio,
                                               renderer.sample_rate))
            finally:
                self.transformer.train(was_training)
        event = SamplesSaved(step, tuple(files), renderer.sample_rate, time.perf_counter() - started)
        self.on_event(event)
        return event

    def _load(self) -> Renderer:
        if self._renderer is None:
            self.on_event(Notice("Loading the VAE, text and condition encoders for samples (kept on the CPU between "
                                 "renders).", "info"))
            cpu = replace(self.runtime, device=torch.device("cpu"))
            encoders: Encoders = load_encoders(self.entry, self.checkpoint_dir, cpu)
            self._renderer = Renderer(self.transformer, encoders, self.variant)
        return self._renderer
