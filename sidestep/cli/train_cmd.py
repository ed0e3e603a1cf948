"""`sidestep train`: build a TrainConfig from the flags and call `sidestep.training.run.train` once."""

from __future__ import annotations

from dataclasses import fields
from enum import Enum
from typing import Any

from sidestep.cli.options import (AdapterKindOpt, AdapterRankOpt, AlphaOpt, BaseVariantOpt, BatchSizeOpt,
                                  CfgDropoutOpt, CheckpointDirOpt, DatasetDirOpt, DeviceOpt, DropoutOpt, EpochsOpt,
                                  GradAccumOpt, GradientCheckpointingOpt, IgnoreFisherMapOpt, InitOpt, JsonOpt, LrOpt,
                                  MaxGradNormOpt, MaxLatentLengthOpt, MaxStepsOpt, ModelOpt, OptimizerOpt, OutputDirOpt,
                                  OverwriteOpt, PrecisionOpt, ResumeOpt, SampleEveryOpt, SamplePromptsOpt,
                                  SampleStepsOpt, SaveEveryOpt, SchedulerOpt, SeedOpt,
                                  SpikeFactorOpt, TargetModulesOpt, TimestepModeOpt, WarmupStepsOpt)
from sidestep.display import output
from sidestep.display.training import TrainDisplay
from sidestep.errors import ConfigError
from sidestep.training.config import TrainConfig

__all__ = ["train"]


def _default(name: str) -> Any:
    value = {f.name: f.default for f in fields(TrainConfig)}[name]
    if isinstance(value, tuple):
        return ",".join(value).replace("_", "-")
    return value.value if isinstance(value, Enum) else value


def train(
    dataset_dir: DatasetDirOpt = None,
    output_dir: OutputDirOpt = None,
    checkpoint_dir: CheckpointDirOpt = None,
    model: ModelOpt = None,
    base_variant: BaseVariantOpt = None,
    rank: AdapterRankOpt = _default("rank"),
    alpha: AlphaOpt = None,
    dropout: DropoutOpt = _default("dropout"),
    target_modules: TargetModulesOpt = _default("target_modules"),
    adapter: AdapterKindOpt = _default("adapter"),
    lr: LrOpt = _default("lr"),
    optimizer: OptimizerOpt = _default("optimizer"),
    scheduler: SchedulerOpt = _default("scheduler"),
    warmup_steps: WarmupStepsOpt = _default("warmup_steps"),
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

    if dataset_dir is None:
        raise ConfigError("--dataset-dir is required: the folder of preprocessed .pt files to train on.")
    if output_dir is None:
        raise ConfigError("--output-dir is required: where the checkpoints and the final adapter go.")
    config = TrainConfig(
        dataset_dir=dataset_dir, output_dir=output_dir, rank=rank, alpha=alpha, dropout=dropout,
        target_modules=target_modules, adapter=adapter, lr=lr, optimizer=optimizer, scheduler=scheduler,
        warmup_steps=warmup_steps, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        max_grad_norm=max_grad_norm, seed=seed, save_every=save_every, resume=resume,
        ignore_fisher_map=ignore_fisher_map, cfg_dropout=cfg_dropout, timestep_mode=timestep_mode,
        max_latent_length=max_latent_length, init=init, spike_factor=spike_factor, overwrite=overwrite,
        sample_every=sample_every, sample_prompts=sample_prompts, sample_steps=sample_steps,
    )
    choice = choose_model(checkpoint_dir, model, base_variant)
    runtime = choose_runtime(device, precision, gradient_checkpointing)
    with TrainDisplay(config.output_dir) as display:
        outcome = run_training(config, choice, runtime, display.on_event)
    if json:
        output.emit_json(outcome.to_json())
    else:
        ema = "n/a" if outcome.loss_ema is None else f"{outcome.loss_ema:.4f}"
        output.success(f"Trained {outcome.steps} steps (loss EMA {ema}); adapter in {outcome.final_dir}")
        output.info(f"Export it for other loaders with `sidestep export --format comfyui {outcome.final_dir} DEST`.")
