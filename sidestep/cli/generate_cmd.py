"""`sidestep generate`: build a GenerateConfig from the flags and call `sidestep.training.generate.generate` once."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from sidestep.display import output
from sidestep.cli.options import COMMON, SCHEDULE, BaseVariantOpt, CheckpointDirOpt, DeviceOpt, JsonOpt, ModelOpt, PrecisionOpt
from sidestep.errors import ConfigError

__all__ = ["generate"]

PromptOpt = Annotated[str | None, typer.Option("--prompt", help="What the music is: genre, instruments, mood.",
                                               show_default=False, rich_help_panel=COMMON)]
LyricsOpt = Annotated[str | None, typer.Option("--lyrics", help="Lyrics with [Verse]/[Chorus] tags (default: "
                                                                "[Instrumental]).", show_default=False, rich_help_panel=COMMON)]
DurationOpt = Annotated[float, typer.Option("--duration", help="Seconds of audio per clip (a prompts file may set its own).", rich_help_panel=COMMON)]
GenSeedOpt = Annotated[int, typer.Option("--seed", help="Noise seed; the same seed gives the same audio (file entries "
                                                        "without a seed use SEED + their position).", rich_help_panel=COMMON)]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Sampling steps (default: 8 for turbo, 50 for base/sft).",
                                              show_default=False, rich_help_panel=SCHEDULE)]
GuidanceOpt = Annotated[float | None, typer.Option("--guidance", help="Guidance scale for base/sft (default 7; turbo "
                                                                      "has none).", show_default=False, rich_help_panel=SCHEDULE)]
ShiftOpt = Annotated[float | None, typer.Option("--shift", help="Timestep shift (default: 3 for turbo, 1 for base/sft).",
                                                show_default=False, rich_help_panel=SCHEDULE)]
BpmOpt = Annotated[int | None, typer.Option("--bpm", help="Tempo hint, 30-300.", show_default=False, rich_help_panel=COMMON)]
KeyscaleOpt = Annotated[str | None, typer.Option("--keyscale", help="Key hint, e.g. \"C major\".", show_default=False, rich_help_panel=COMMON)]
PromptsOpt = Annotated[Path | None, typer.Option("--prompts", help="A .toml (a prompts array of tables) or .json list of "
                                                                   "prompts: prompt, lyrics, duration, seed, bpm, keyscale, "
                                                                   "name.",
                                                 show_default=False, rich_help_panel=COMMON)]
AdapterPathOpt = Annotated[Path | None, typer.Option("--adapter", help="An adapter folder, a training output folder, "
                                                                       "or an exported diffusers/ComfyUI .safetensors.",
                                                     show_default=False, rich_help_panel=COMMON)]
StrengthOpt = Annotated[float, typer.Option("--strength", help="Adapter strength: 0 = the base model, 1 = as trained.", rich_help_panel=COMMON)]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder for the .wav files and their settings .json.", rich_help_panel=COMMON)]
ReplaceOpt = Annotated[bool, typer.Option("--overwrite", help="Replace .wav/.json files of the same names in --out.", rich_help_panel=COMMON)]
CompareOpt = Annotated[bool, typer.Option("--compare", help="Also render the base model with the same prompts and seeds "
                                                            "(NAME.base.wav beside NAME.adapter.wav).", rich_help_panel=COMMON)]


def generate(
    prompt: PromptOpt = None,
    lyrics: LyricsOpt = None,
    duration: DurationOpt = 30.0,
    seed: GenSeedOpt = 0,
    bpm: BpmOpt = None,
    keyscale: KeyscaleOpt = None,
    prompts: PromptsOpt = None,
    adapter: AdapterPathOpt = None,
    strength: StrengthOpt = 1.0,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    shift: ShiftOpt = None,
    out: OutOpt = Path("generated"),
    compare: CompareOpt = False,
    overwrite: ReplaceOpt = False,
    checkpoint_dir: CheckpointDirOpt = None,
    model: ModelOpt = None,
    base_variant: BaseVariantOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    json: JsonOpt = False,
) -> None:
    """Render music from text (48 kHz stereo WAV) with the base model or a trained adapter."""
    from sidestep.generation import PromptDefaults, make_prompt, read_prompts  # imports torch: keep `--help` fast
    from sidestep.models.select import choose_model, choose_runtime
    from sidestep.training.generate import GenerateConfig
    from sidestep.training.generate import generate as run_generate

    defaults = PromptDefaults(duration=duration, seed=seed, lyrics="[Instrumental]" if lyrics is None else lyrics)
    if prompts is not None and prompt is not None:
        raise ConfigError("Give either --prompt or --prompts FILE, not both.")
    if prompts is not None:
        if bpm is not None or keyscale is not None:
            raise ConfigError("--bpm and --keyscale go with --prompt; in a --prompts file set them per entry.")
        items = read_prompts(prompts, defaults)
    elif prompt is not None:
        raw = {"prompt": prompt, "bpm": bpm, "keyscale": keyscale}
        items = (make_prompt("--prompt", {k: v for k, v in raw.items() if v is not None}, defaults),)
    else:
        raise ConfigError("Nothing to render: give --prompt \"TEXT\" or --prompts FILE (TOML or JSON).")
    config = GenerateConfig(items, out, adapter=adapter, strength=strength, steps=steps, guidance=guidance,
                            shift=shift, compare=compare, overwrite=overwrite)
    choice = choose_model(checkpoint_dir, model, base_variant)
    runtime = choose_runtime(device, precision, False)

    loading = contextlib.ExitStack()

    def show(event) -> None:
        loading.close()  # the models are in; rendering starts
        label = f" ({event.label})" if config.compare else ""
        if not json:
            output.info(f"Rendering {event.index + 1}/{event.total}: {event.name}{label}")

    with loading:
        loading.enter_context(output.status("Loading the model, the VAE and the text encoder…"))
        outcome = run_generate(config, choice, runtime, show)
    if json:
        output.emit_json(outcome.to_json())
        return
    files = sum(len(c.files) for c in outcome.clips)
    output.success(f"Rendered {files} clip{'s' if files != 1 else ''} ({outcome.settings.steps} steps, guidance "
                   f"{outcome.settings.guidance:g}) into {outcome.out_dir}")
