"""`sidestep train`: build a TrainConfig from the flags (over a --config file and a --preset) and call
`sidestep.training.run.train` once."""

from __future__ import annotations

from dataclasses import fields
from enum import Enum
from typing import Any

import typer

from sidestep.cli.options import (AdapterKindOpt, AdapterRankOpt, AlphaOpt, BaseVariantOpt, BatchSizeOpt,
                                  CfgDropoutOpt, CheckpointDirOpt, ConfigFileOpt, DatasetDirOpt, DeviceOpt, DropoutOpt,
                                  EpochsOpt, GradAccumOpt, GradientCheckpointingOpt, IgnoreFisherMapOpt, InitOpt,
                                  JsonOpt, KeepLastOpt, LrOpt, MaxGradNormOpt, MaxLatentLengthOpt, MaxStepsOpt,
                                  ModelOpt, OptimizerOpt, OutputDirOpt, OverwriteOpt, PrecisionOpt, PresetOpt,
                                  ReportToOpt, ResumeOpt, SampleEveryOpt, SamplePromptsOpt, SampleStepsOpt,
                                  SaveEveryOpt, SaveEveryStepsOpt, SchedulerOpt, SeedOpt, SpikeFactorOpt,
                                  TargetModulesOpt, TimestepModeOpt, ValDirOpt, ValEveryOpt, ValSplitOpt,
                                  WarmupStepsOpt)
from sidestep.cli.recipe import apply_recipe
from sidestep.display import output
from sidestep.display.training import TrainDisplay
from sidestep.errors import ConfigError
from sidestep.training.config import TrainConfig

__all__ = ["train"]

_CONFIG_FIELDS = tuple(f.name for f in fields(TrainConfig))


def _default(name: str) -> Any:
    value = {f.name: f.default for f in fields(TrainConfig)}[name]
    if isinstance(value, tuple):
        return ",".join(value).replace("_", "-")
    return value.value if isinstance(value, Enum) else value


def train(
    ctx: typer.Context,
    dataset_dir: DatasetDirOpt = None,
    output_dir: OutputDirOpt = None,
    config_file: ConfigFileOpt = None,
    preset: PresetOpt = None,
    checkpoint_dir: CheckpointDirOpt = None,
    model: ModelOpt = None,
    base_variant: BaseVariantOpt = None,
    rank: AdapterRankOpt = _default("rank"),
    alpha: AlphaOpt = None,
    dropout: DropoutOpt = _default("dropout"),
    target_modules: TargetModulesOpt = _default("target_modules"),
    adapter: AdapterKindOpt = _default("adapter"),
    lr: LrOpt = None,
    optimizer: OptimizerOpt = _default("optimizer"),
    scheduler: SchedulerOpt = _default("scheduler"),
    warmup_steps: WarmupStepsOpt = None,
    epochs: EpochsOpt = _default("epochs"),
    max_steps: MaxStepsOpt = None,
    batch_size: BatchSizeOpt = _default("batch_size"),
    grad_accum: GradAccumOpt = _default("grad_accum"),
    max_grad_norm: MaxGradNormOpt = _default("max_grad_norm"),
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    gradient_checkpointing: GradientCheckpointingOpt = None,
    seed: SeedOpt = _default("seed"),
    save_every: SaveEveryOpt = _default("save_every"),
    save_every_steps: SaveEveryStepsOpt = _default("save_every_steps"),
    keep_last: KeepLastOpt = _default("keep_last"),
    val_split: ValSplitOpt = _default("val_split"),
    val_dir: ValDirOpt = None,
    val_every: ValEveryOpt = None,
    report_to: ReportToOpt = _default("report_to"),
    resume: ResumeOpt = None,
    ignore_fisher_map: IgnoreFisherMapOpt = False,
    cfg_dropout: CfgDropoutOpt = _default("cfg_dropout"),
    timestep_mode: TimestepModeOpt = None,
    max_latent_length: MaxLatentLengthOpt = None,
    init: InitOpt = _default("init"),
    spike_factor: SpikeFactorOpt = _default("spike_factor"),
    sample_every: SampleEveryOpt = _default("sample_every"),
    sample_prompts: SamplePromptsOpt = None,
    sample_steps: SampleStepsOpt = None,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train a LoRA/DoRA/LoKr/LoHa adapter; a fisher_map.json in the dataset switches on Adaptive Rank."""
    from sidestep.models.select import choose_model, choose_runtime  # imports torch: keep `--help` fast
    from sidestep.training.run import train as run_training

    recipe = apply_recipe(ctx, config_file, preset, extra=_CONFIG_FIELDS)
    opts = recipe.values
    if opts["dataset_dir"] is None:
        raise ConfigError("--dataset-dir is required: the folder of preprocessed .pt files to train on.")
    if opts["output_dir"] is None:
        raise ConfigError("--output-dir is required: where the checkpoints and the final adapter go.")
    config = TrainConfig(**{name: opts[name] for name in _CONFIG_FIELDS if name in opts})
    choice = choose_model(opts["checkpoint_dir"], opts["model"], opts["base_variant"])
    runtime = choose_runtime(opts["device"], opts["precision"], opts["gradient_checkpointing"])
    # where the values came from, said once training starts (a refused run stays one sentence)
    intro = recipe.lines() if config_file is not None or preset is not None else []
    explicit = frozenset(name for name in recipe.chosen if name in _CONFIG_FIELDS)
    with TrainDisplay(config.output_dir, intro=intro) as display:
        outcome = run_training(config, choice, runtime, display.on_event, explicit)
    if json:
        output.emit_json(outcome.to_json())
    else:
        ema = "n/a" if outcome.loss_ema is None else f"{outcome.loss_ema:.4f}"
        output.success(f"Trained {outcome.steps} steps (loss EMA {ema}); adapter in {outcome.final_dir}")
        output.info(f"Export it for other loaders with `sidestep export --format comfyui {outcome.final_dir} DEST`.")
