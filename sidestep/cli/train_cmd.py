"""`sidestep train`: build a TrainConfig from the flags and call `sidestep.training.run.train` once."""

from __future__ import annotations

from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sidestep.cli import output
from sidestep.cli.app import app
from sidestep.cli.options import (AdapterKindOpt, AdapterRankOpt, AlphaOpt, BaseVariantOpt, BatchSizeOpt,
                                  CfgDropoutOpt, CheckpointDirOpt, DatasetDirOpt, DeviceOpt, DropoutOpt, EpochsOpt,
                                  GradAccumOpt, GradientCheckpointingOpt, IgnoreFisherMapOpt, InitOpt, JsonOpt, LrOpt,
                                  MaxGradNormOpt, MaxLatentLengthOpt, MaxStepsOpt, ModelOpt, OptimizerOpt, OutputDirOpt,
                                  OverwriteOpt, PrecisionOpt, ResumeOpt, SampleEveryOpt, SamplePromptsOpt,
                                  SampleStepsOpt, SaveEveryOpt, SchedulerOpt, SeedOpt,
                                  SpikeFactorOpt, TargetModulesOpt, TimestepModeOpt, WarmupStepsOpt)
from sidestep.errors import ConfigError
from sidestep.training.config import TrainConfig

__all__ = ["train", "TrainDisplay"]


def _default(name: str) -> Any:
    value = {f.name: f.default for f in fields(TrainConfig)}[name]
    if isinstance(value, tuple):
        return ",".join(value).replace("_", "-")
    return value.value if isinstance(value, Enum) else value


@app.command()
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


class TrainDisplay:
    """The rich progress bar and messages for training events; TensorBoard scalars when it is installed."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("epoch {task.fields[epoch]:.2f}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=output.console, transient=False,
        )
        self.task: Any = None
        self.writer: Any = None

    def __enter__(self) -> "TrainDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.task is not None:  # the bar only exists once training started, so early errors stay one line
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()

    def on_event(self, event: Any) -> None:
        from sidestep.training import events

        if isinstance(event, events.Progress):
            self._progress(event)
        elif isinstance(event, events.Notice):
            (output.warn if event.level == "warning" else output.info)(event.message)
        elif isinstance(event, events.MapSummary):
            print_map_summary(event)
        elif isinstance(event, events.Started):
            self._started(event)
        elif isinstance(event, events.CheckpointSaved):
            output.info(f"{'Final adapter' if event.final else 'Checkpoint'} saved: {event.path}")
        elif isinstance(event, events.SamplesSaved):
            self._samples(event)

    def _samples(self, event: Any) -> None:
        folder = event.files[0].parent if event.files else "-"
        output.info(f"Samples at step {event.step}: {len(event.files)} in {folder} ({event.seconds:.1f} s)")
        if self.writer is not None:
            import soundfile as sf
            import torch

            for path in event.files:
                audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
                mono = torch.from_numpy(audio.mean(axis=1))[None]  # TensorBoard audio is mono
                self.writer.add_audio(f"samples/{path.stem}", mono, event.step, sample_rate=rate)

    def _started(self, event: Any) -> None:
        output.info(f"Model: {event.model}")
        output.info(f"Runtime: {event.runtime}")
        mode = "Adaptive Rank" if event.adaptive else "flat rank"
        resumed = f", resuming at step {event.start_step}" if event.start_step else ""
        output.info(f"{event.samples} samples, {event.steps_per_epoch} steps/epoch, {event.total_steps} steps "
                    f"({mode}, {event.trainable_params:,} trainable parameters, timesteps {event.timestep_mode}{resumed}).")
        if event.processes > 1:
            output.info(f"{event.processes} processes: effective batch {event.effective_batch} "
                        f"(batch × grad-accum × {event.processes} processes).")
        self.task = self.bar.add_task("train", total=event.total_steps, completed=event.start_step,
                                      epoch=0.0, loss="-", lr="-", rate="-")
        self.bar.start()
        self.writer = _tensorboard(self.output_dir / "tensorboard")

    def _progress(self, event: Any) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=event.step, epoch=event.epoch, loss=f"{event.loss_ema:.4f}",
                            lr=f"{event.lr:.2e}", rate=f"{event.it_per_s:.2f}")
        if self.writer is not None:
            for name, value in (("loss", event.loss), ("loss_ema", event.loss_ema), ("lr", event.lr)):
                self.writer.add_scalar(f"train/{name}", value, event.step)


def print_map_summary(summary: Any) -> None:
    """"Preprocessing++ map detected" and what the map changes; shared with the wizard."""
    adapted = sum(a for a, _ in summary.per_category.values())
    total = sum(t for _, t in summary.per_category.values())
    cats = ", ".join(f"{cat} {a}/{t}" for cat, (a, t) in summary.per_category.items())
    ranks = ", ".join(f"{rank}×{count}" for rank, count in summary.rank_histogram.items())
    share = summary.trainable_params / summary.flat_params if summary.flat_params else 0.0
    output.success(f"Preprocessing++ map detected: {summary.map_path}")
    output.info(f"  Adaptive Rank: {adapted}/{total} modules adapted ({cats})")
    output.info(f"  Ranks (rank×modules): {ranks}")
    output.info(f"  Trainable parameters: {summary.trainable_params:,} vs {summary.flat_params:,} for a flat rank "
                f"{summary.flat_rank} on every module ({share:.0%})")
    if summary.overrides:
        output.info(f"  The map sets each module's rank, alpha and target; not used: {', '.join(summary.overrides)}")


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(folder))
