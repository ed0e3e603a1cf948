"""`train()`: the one library entry `sidestep train` calls: preflight, adapter plan, loop, saving."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from sidestep import __version__, distributed
from sidestep.analysis.fisher_map import ADVISED_LR
from sidestep.data import DatasetSpec, scan_dataset
from sidestep.errors import CheckpointError, ConfigError
from sidestep.interrupts import deferred
from sidestep.models import LoadedModel, Runtime, load_model
from sidestep.models.loading import build_transformer
from sidestep.models.select import ModelChoice
from sidestep.objective import sampler_for_training
from sidestep.training import saving
from sidestep.training.adapters import (AdapterPlan, MapSummary, attach_adapter, check_plan_fits, module_shapes,
                                        plan_adapter, summarize)
from sidestep.training.config import InitMode, TrainConfig
from sidestep.training.events import CheckpointSaved, Notice, OnEvent, Started, noop
from sidestep.training.grad_init import InitPlan, resolve_init
from sidestep.training.loop import (LoopContext, LoopState, Optimization, SampleOrder, build_optimization, capture_rng,
                                    restore_rng, train_loop)
from sidestep.training.parallel import effective_batch, resume_notice, seed_process_rng, sync_for
from sidestep.training.sampling import SamplePlan, TrainingSampler, plan_samples

__all__ = ["TrainOutcome", "train"]

_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class TrainOutcome:
    final_dir: Path
    steps: int
    loss_ema: float | None
    adaptive: bool
    trainable_params: int
    modules: int
    run_json: Path

    def to_json(self) -> dict[str, Any]:
        return {"final_dir": str(self.final_dir), "steps": self.steps, "loss_ema": self.loss_ema,
                "adaptive": self.adaptive, "trainable_params": self.trainable_params, "modules": self.modules,
                "run_json": str(self.run_json)}


def train(config: TrainConfig, choice: ModelChoice, runtime: Runtime, on_event: OnEvent = noop) -> TrainOutcome:
    """Train an adapter on `config.dataset_dir` and save it under `config.output_dir`.

    Process 0 holds a lock on the output folder for the whole run: a second `train` into it refuses.
    """
    if not distributed.current().is_main:
        return _train(config, choice, runtime, on_event)
    with saving.output_lock(config.output_dir):
        return _train(config, choice, runtime, on_event)


def _train(config: TrainConfig, choice: ModelChoice, runtime: Runtime, on_event: OnEvent) -> TrainOutcome:
    # ---- preflight: every file checked, map read, output folder settled, before any weight is loaded
    # (under torchrun each process trains its shard; only process 0 reports and writes: training/parallel.py)
    entry = choice.entry
    dist = distributed.current()
    on_event = on_event if dist.is_main else noop
    pre = _preflight(config, choice, on_event)
    plan, resume_dir, resumed, order, total = pre.plan, pre.resume_dir, pre.resumed, pre.order, pre.total

    # ---- model and adapter (seeded init; resumed weights replace it)
    loaded = load_model(entry, runtime)
    torch.manual_seed(config.seed)
    trainable = attach_adapter(loaded.transformer, plan, pre.init)
    if resume_dir is not None:
        saving.load_adapter_weights(loaded.transformer, pre.resume_tensors)

    # ---- optimizer, schedule and the state to continue from
    named = sorted((n, p) for n, p in loaded.transformer.named_parameters() if p.requires_grad)
    distributed.broadcast_tensors([p for _, p in named])  # the same start everywhere (cheap for adapters)
    opt = build_optimization([p for _, p in named], config, total, runtime)
    state = LoopState()
    if resumed is not None:
        state = _restore(resumed, opt, resume_dir)
    seed_process_rng(config.seed, state.step)
    # run.json is written once the final adapter is, so a failed run never replaces the record of a good one
    record = _run_record(config, choice, runtime, loaded, plan, total) | {"init": pre.init.to_json()}
    sampler = sampler_for_training(config.timestep_mode, loaded.variant)
    mode = config.timestep_mode or ("discrete" if loaded.variant.is_turbo else "continuous")
    on_event(Started(entry.label, runtime.reason, len(order.files), math.ceil(order.micro_per_epoch / config.grad_accum),
                     total, state.step, trainable, plan.adaptive, mode, dist.world_size, effective_batch(config)))

    # ---- train, checkpointing every save_every epochs and on Ctrl-C
    def checkpoint(st: LoopState, final: bool = False) -> Path:
        path = saving.final_dir(config.output_dir) if final else saving.checkpoint_dir(config.output_dir, st.step)
        epoch = st.step * config.grad_accum / order.micro_per_epoch
        if dist.is_main:
            with deferred():  # a checkpoint being written completes before a Ctrl-C/SIGTERM is acted on
                try:
                    saving.save_adapter_dir(path, plan, loaded.transformer, _state_payload(st, epoch, opt, config, plan))
                except saving.SaveFailed as err:
                    if final:
                        raise
                    raise CheckpointError(f"{str(err).rstrip('.')}; training stopped at step {st.step}, "
                                          f"{_kept(st.last_checkpoint)}.") from err
            on_event(CheckpointSaved(path, st.step, final))
        return path

    # ---- audio samples at step 0 and every sample_every steps (process 0 only; the others go on to the next sync)
    callbacks = ()
    if pre.samples is not None and dist.is_main:
        callbacks = (TrainingSampler(loaded.transformer, entry, choice.checkpoint_dir, runtime, loaded.variant,
                                     pre.samples, total, config.output_dir, on_event),)
    ctx = LoopContext(loaded.transformer, order, opt, config, sampler, loaded.null_condition_emb, runtime, total,
                      checkpoint, _advice(plan, loaded.variant.is_turbo), on_event=on_event, sync=sync_for(dist),
                      callbacks=callbacks)
    state = train_loop(ctx, state)
    final = distributed.run_on_main(lambda: _save_final(config, state, checkpoint))
    run_json = distributed.run_on_main(lambda: saving.write_run_json(config.output_dir, record))
    return TrainOutcome(final, state.step, state.loss_ema, plan.adaptive, trainable, len(plan.ranks), run_json)


def _save_final(config: TrainConfig, state: LoopState, checkpoint: Callable[..., Path]) -> Path:
    """All or nothing: the new final/ appears whole, or the previous one is back and the last checkpoint is named."""
    backup = saving.backup_final(config.output_dir)  # a resumed run that extends a finished one keeps the old as final.bak
    try:
        return checkpoint(state, final=True)
    except saving.SaveFailed as err:
        restored = saving.restore_final(config.output_dir, backup)
        previous = "the previous final/ is restored" if restored else "no final adapter was written"
        raise CheckpointError(f"{str(err).rstrip('.')}: {previous} and {_kept(state.last_checkpoint)}.") from err


def _kept(last: Path | None) -> str:
    if last is None:
        return "no checkpoint was saved in this run (use --save-every to keep some)"
    return f"the last checkpoint {last} is kept (free some space, then continue with --resume latest)"


@dataclass(frozen=True)
class _Preflight:
    plan: AdapterPlan
    resume_dir: Path | None
    resumed: dict[str, Any] | None
    resume_tensors: dict[str, torch.Tensor]
    order: SampleOrder
    total: int
    init: InitPlan
    samples: SamplePlan | None


def _preflight(config: TrainConfig, choice: ModelChoice, on_event: OnEvent) -> _Preflight:
    """Dataset scan, adapter plan (map + warnings), resume state and the output folder; no weights loaded."""
    entry = choice.entry
    spec = DatasetSpec.from_model_config(entry.config)
    scan = scan_dataset(config.dataset_dir, spec)
    for problem in scan.problems:  # samples with nothing to learn from (all-zero mask) are left out, not fatal
        on_event(Notice(f"Skipped {problem}"))
    variant = entry.defaults
    plan = plan_adapter(config, variant.name, variant.is_turbo, int(entry.config["num_hidden_layers"]))
    resume_dir = saving.resolve_resume(config.output_dir, config.resume) if config.resume else None
    resumed = saving.load_training_state(resume_dir) if resume_dir else None
    resume_tensors = saving.read_adapter_dir(resume_dir).tensors if resume_dir else {}
    if resume_dir is not None:
        saving.check_finite(resume_dir, resume_tensors)
    if resumed is not None:
        plan = _resumed_plan(resumed, plan, resume_dir, on_event)
        if (notice := resume_notice(resumed, config, resume_dir)) is not None:
            on_event(notice)
    cache = sum(p.stat().st_size for p in scan.files) <= _CACHE_BYTES  # small datasets stay in RAM
    dist = distributed.current()
    order = SampleOrder(scan.files, spec, config.batch_size, config.seed, config.max_latent_length,
                        rank=dist.rank, world_size=dist.world_size, cache=cache)
    total = config.max_steps or math.ceil(config.epochs * order.micro_per_epoch / config.grad_accum)
    if resumed is not None and int(resumed["step"]) >= total:
        raise ConfigError(f"--resume {resume_dir} already has {resumed['step']} of {total} steps; raise "
                          f"--epochs or --max-steps to train further.")
    if plan.adaptive:  # checked and sized on a weightless (meta) copy, before the slow load
        summary = _map_summary(plan, entry.config)
        if dist.is_main:
            on_event(summary)
    for message in plan.notices:
        on_event(Notice(message))
    samples = plan_samples(config, entry, choice.checkpoint_dir, variant, scan.files)
    init = _resolve_init(config, plan, resumed, entry.config)
    if init.notice is not None:
        on_event(Notice(init.notice, init.level))
    continuing = resume_dir is not None and Path(config.output_dir).resolve() in resume_dir.resolve().parents
    distributed.run_on_main(lambda: saving.prepare_output(config.output_dir, continuing, config.overwrite))
    return _Preflight(plan, resume_dir, resumed, resume_tensors, order, total, init, samples)


def _resolve_init(config: TrainConfig, plan: AdapterPlan, resumed: dict[str, Any] | None,
                  model_config: dict[str, Any]) -> InitPlan:
    """`--init gradient` bases checked against the plan (a resumed run keeps its trained weights instead)."""
    if resumed is not None or config.init is not InitMode.GRADIENT:
        return InitPlan(InitMode.DEFAULT)
    shapes = module_shapes(build_transformer(model_config, "meta").requires_grad_(False))
    return resolve_init(config, plan.ranks, shapes)


def _map_summary(plan: AdapterPlan, model_config: dict[str, Any]) -> MapSummary:
    meta = build_transformer(model_config, "meta").requires_grad_(False)
    shapes = module_shapes(meta)
    check_plan_fits(plan, shapes)
    return summarize(plan, shapes, attach_adapter(meta, plan), plan.base_rank)


def _resumed_plan(resumed: dict[str, Any], current: AdapterPlan, resume_dir: Path, on_event: OnEvent) -> AdapterPlan:
    """Resuming keeps the checkpoint's adapter layout, whatever the map or flags say now."""
    plan = AdapterPlan.from_json(resumed["plan"])
    if (plan.kind, plan.ranks, plan.alphas) != (current.kind, current.ranks, current.alphas):
        on_event(Notice(f"Resuming with the adapter layout saved in {resume_dir} ({len(plan.ranks)} modules); "
                        "the current map or --rank/--target-modules differ and are not used.", "info"))
    return replace(plan, notices=current.notices if plan.adaptive else ())


def _restore(resumed: dict[str, Any], opt: Optimization, resume_dir: Path) -> LoopState:
    opt.optimizer.load_state_dict(resumed["optimizer"])
    opt.scheduler.load_state_dict(resumed["scheduler"])
    if resumed.get("scaler"):
        opt.scaler.load_state_dict(resumed["scaler"])
    restore_rng(resumed.get("rng"))
    return LoopState(int(resumed["step"]), resumed.get("loss_ema"), resumed.get("rng") or capture_rng(), resume_dir)


def _state_payload(st: LoopState, epoch: float, opt: Optimization, config: TrainConfig,
                   plan: AdapterPlan) -> dict[str, Any]:
    return {"step": st.step, "epoch": epoch, "loss_ema": st.loss_ema, "rng": st.rng, "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(),
            "config": config.to_json(), "plan": plan.to_json(), "effective_batch": effective_batch(config)}


def _advice(plan: AdapterPlan, is_turbo: bool) -> str:
    if plan.adaptive:
        base = " or train on base" if is_turbo else ""
        return (f"Lower --lr (e.g. {ADVISED_LR}) and check samples early; if the loss keeps spiking, delete "
                f"fisher_map.json or pass --ignore-fisher-map{base}.")
    return "Lower --lr (e.g. by half), keep --max-grad-norm on, and check the dataset; then --resume the checkpoint."


def _run_record(config: TrainConfig, choice: ModelChoice, runtime: Runtime, loaded: LoadedModel,
                plan: AdapterPlan, total: int) -> dict[str, Any]:
    return {
        "tool": {"name": "sidestep", "version": __version__},
        "started_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "config": config.to_json(),
        "total_steps": total,
        "model": {"name": choice.entry.name, "path": str(choice.entry.path), "layout": choice.entry.layout.value,
                  "variant": loaded.variant.name, "num_layers": loaded.num_layers, "sources": choice.sources},
        "runtime": {"device": str(runtime.device), "precision": runtime.precision,
                    "gradient_checkpointing": runtime.gradient_checkpointing, "reason": runtime.reason},
        "adapter": {**plan.to_json(), "overrides": list(plan.overrides)},
    }
