"""`train()`: the one library entry `sidestep train` calls: preflight, adapter plan, loop, saving."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from sidestep import __version__, distributed
from sidestep.analysis.fisher_map import ADVISED_LR
from sidestep.data import DatasetSpec, scan_dataset
from sidestep.errors import CheckpointError, ConfigError, Interrupted, SidestepError, TrainingDiverged
from sidestep.fileio import write_error_reason
from sidestep.interrupts import deferred
from sidestep.models import LoadedModel, Runtime, load_model
from sidestep.models.loading import build_transformer
from sidestep.models.select import ModelChoice
from sidestep.objective import sampler_for_training
from sidestep.training import saving
from sidestep.training.adapters import (AdapterPlan, MapSummary, attach_adapter, check_plan_fits, clamp_ranks,
                                        module_shapes, plan_adapter, summarize)
from sidestep.training.config import InitMode, TrainConfig, resolve_auto
from sidestep.training.events import CheckpointSaved, Notice, OnEvent, SamplesSaved, Started, noop
from sidestep.training.grad_init import InitPlan, resolve_init
from sidestep.training.loop import (LoopCallback, LoopContext, LoopState, Optimization, SampleOrder, build_optimization,
                                    capture_rng, restore_rng, train_loop)
from sidestep.training.records import (BEST_DIR, METRICS_FILE, Checkpointer, MetricsLog, RunRecorder, Validator,
                                       split_validation)
from sidestep.training.report import Reporter, open_reporter
from sidestep.training.parallel import effective_batch, resume_notice, seed_process_rng, sync_for
from sidestep.training.sampling import SamplePlan, TrainingSampler, plan_samples

__all__ = ["TrainOutcome", "train"]

_CACHE_BYTES = 2 << 30
BEST_FILE = "best.json"  # in best/: the step and validation loss it was saved at


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


def train(config: TrainConfig, choice: ModelChoice, runtime: Runtime, on_event: OnEvent = noop,
          explicit: frozenset[str] | None = None) -> TrainOutcome:
    """Train an adapter on `config.dataset_dir` and save it under `config.output_dir`.

    `explicit`: the config fields the user set (the CLI knows; it decides which flags a map "overrides").
    Process 0 holds a lock on the output folder for the whole run: a second `train` into it refuses.
    """
    if not distributed.current().is_main:
        return _train(config, choice, runtime, on_event, explicit)
    with saving.output_lock(config.output_dir):
        return _train(config, choice, runtime, on_event, explicit)


def _train(config: TrainConfig, choice: ModelChoice, runtime: Runtime, on_event: OnEvent,
           explicit: frozenset[str] | None) -> TrainOutcome:
    # ---- preflight: every file checked, map read, "auto" values resolved, output folder settled, before any
    # weight is loaded (under torchrun each process trains its shard; only process 0 reports and writes)
    began = time.perf_counter()
    entry = choice.entry
    dist = distributed.current()
    on_event = on_event if dist.is_main else noop
    pre = _preflight(config, choice, on_event, explicit)
    config = pre.config  # every "auto" resolved: this is what trains and what run.json records
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
    # ---- the record: run.json now (status "running"), again at the end with the outcome; a dashboard if asked
    record = _run_record(config, choice, runtime, loaded, plan, total, pre) | {"init": pre.init.to_json()}
    reporter = None
    if dist.is_main:
        reporter, missing = open_reporter(config.report_to, config.output_dir, record)
        if missing is not None:
            on_event(Notice(missing))
        record["report_to"] = config.report_to.value if reporter is not None else "none"
        on_event = _tap_samples(on_event, reporter)
    sampler = sampler_for_training(config.timestep_mode, loaded.variant)
    on_event(Started(entry.label, runtime.reason, len(order.files), math.ceil(order.micro_per_epoch / config.grad_accum),
                     total, state.step, trainable, plan.adaptive, config.timestep_mode, dist.world_size,
                     effective_batch(config)))

    # ---- train, checkpointing every save_every epochs and on Ctrl-C
    def checkpoint(st: LoopState, final: bool = False) -> Path:
        path = saving.final_dir(config.output_dir) if final else saving.checkpoint_dir(config.output_dir, st.step)
        epoch = st.step * config.grad_accum / order.micro_per_epoch
        if dist.is_main:
            with deferred():  # a checkpoint being written completes before a Ctrl-C/SIGTERM is acted on
                try:
                    saving.save_adapter_dir(path, plan, loaded.transformer,
                                            _state_payload(st, epoch, opt, config, plan, resumable=not final))
                except saving.SaveFailed as err:
                    if final:
                        raise
                    raise CheckpointError(f"{str(err).rstrip('.')}; training stopped at step {st.step}, "
                                          f"{_kept(st.last_checkpoint)}.") from err
                if not final:  # pruned only now that the new checkpoint is complete on disk
                    saving.prune_checkpoints(config.output_dir, config.keep_last, path)
            on_event(CheckpointSaved(path, st.step, final))
        return path

    def save_best(step: int, val_loss: float) -> Path:
        path = Path(config.output_dir) / BEST_DIR
        with deferred():
            try:
                saving.save_adapter_dir(path, plan, loaded.transformer,
                                        extra={BEST_FILE: {"step": step, "val_loss": val_loss}})
            except saving.SaveFailed as err:
                raise CheckpointError(f"{str(err).rstrip('.')}; training stopped at step {step} (the last "
                                      f"checkpoint under {config.output_dir / 'checkpoints'} resumes).") from err
        return path

    # ---- per step: metrics.csv + validation + best/ (process 0), checkpoints (all), audio samples (process 0;
    # the others go on to the next gradient sync and wait there)
    epoch_of = lambda step: step * config.grad_accum / order.micro_per_epoch  # noqa: E731
    callbacks: list[LoopCallback] = [Checkpointer(checkpoint, config.save_every, config.save_every_steps,
                                                  order.micro_per_epoch, config.grad_accum, total)]
    recorder = None
    if dist.is_main:
        validator = None
        if pre.val_files:
            validator = Validator(loaded.transformer, pre.val_files, order.spec, sampler, config.seed, runtime,
                                  config.max_latent_length, cache=order.cached)
        recorder = RunRecorder(MetricsLog(Path(config.output_dir) / METRICS_FILE), epoch_of, total, on_event,
                               validator, config.val_every or 0, save_best, reporter)
        callbacks.insert(0, recorder)  # the row of a step is written before its checkpoint
        if pre.samples is not None:
            callbacks.append(TrainingSampler(loaded.transformer, entry, choice.checkpoint_dir, runtime, loaded.variant,
                                             pre.samples, total, config.output_dir, on_event))
    ctx = LoopContext(loaded.transformer, order, opt, config, sampler, loaded.null_condition_emb, runtime, total,
                      checkpoint, _advice(plan, loaded.variant.is_turbo), on_event=on_event, sync=sync_for(dist),
                      callbacks=tuple(callbacks))
    if dist.is_main:  # from here on every way out rewrites it with the outcome
        _write_record(config.output_dir, record | {"status": "running"}, on_event)
    try:
        state = train_loop(ctx, state)
        final = distributed.run_on_main(lambda: _save_final(config, state, checkpoint))
    except BaseException as err:
        if dist.is_main:
            _write_record(config.output_dir, _finished(record, _status(err), recorder, began, runtime, err), None)
        raise
    finally:
        if reporter is not None:
            reporter.close()
    run_json = distributed.run_on_main(
        lambda: saving.write_run_json(config.output_dir, _finished(record, "finished", recorder, began, runtime)))
    return TrainOutcome(final, state.step, state.loss_ema, plan.adaptive, trainable, len(plan.ranks), run_json)


def _status(err: BaseException) -> str:
    if isinstance(err, (Interrupted, KeyboardInterrupt)):
        return "stopped"
    return "diverged" if isinstance(err, TrainingDiverged) else "failed"


def _finished(record: dict[str, Any], status: str, recorder: RunRecorder | None, began: float, runtime: Runtime,
              err: BaseException | None = None) -> dict[str, Any]:
    """run.json's outcome: status, steps done, final and best loss, duration, peak memory."""
    last = recorder.last if recorder is not None else None
    best = recorder.best if recorder is not None else None
    result: dict[str, Any] = {
        "status": status,
        "steps_done": last.step if last is not None else 0,
        "final_loss": last.loss if last is not None else None,
        "final_loss_ema": last.loss_ema if last is not None else None,
        "best_val_loss": best[0] if best is not None else None,
        "best_val_step": best[1] if best is not None else None,
        "best_loss_ema": min((r.loss_ema for r in recorder.rows), default=None) if recorder is not None else None,
        "duration_s": round(time.perf_counter() - began, 3),
        "training_seconds": last.seconds if last is not None else 0.0,
        "peak_memory": _peak_memory(runtime),
        "finished_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    if err is not None and status == "failed":
        result["error"] = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return record | {"status": status, "result": result}


def _peak_memory(runtime: Runtime) -> dict[str, int | None]:
    out: dict[str, int | None] = {"device_bytes": None, "host_rss_bytes": None}
    if runtime.device.type == "cuda" and torch.cuda.is_available():
        out["device_bytes"] = int(torch.cuda.max_memory_allocated(runtime.device))
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["host_rss_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
    except (ImportError, OSError):  # no `resource` on Windows
        pass
    return out


def _write_record(output_dir: Path, record: dict[str, Any], on_event: OnEvent | None) -> None:
    """run.json while running, or after a failure: a record that cannot be written must not hide the real error."""
    try:
        saving.write_run_json(output_dir, record)
    except (OSError, SidestepError) as err:
        if on_event is not None:
            on_event(Notice(f"{Path(output_dir) / 'run.json'} cannot be written ({write_error_reason(err)}); "
                            f"training goes on."))


def _tap_samples(on_event: OnEvent, reporter: Reporter | None) -> OnEvent:
    """Also hand rendered samples to the dashboard."""
    if reporter is None:
        return on_event

    def tapped(event: Any) -> None:
        if isinstance(event, SamplesSaved):
            reporter.samples(event)
        on_event(event)

    return tapped


def _save_final(config: TrainConfig, state: LoopState, checkpoint: Callable[..., Path]) -> Path:
    """The last step's resumable state goes to checkpoints/step-N, then the adapter alone (no optimizer state) to
    final/, all or nothing: the new final/ appears whole, or the previous one is back and the last checkpoint is
    named."""
    state.last_checkpoint = checkpoint(state)  # a failure here leaves final/ untouched and names the last one kept
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
    config: TrainConfig  # resolved: no "auto" left
    plan: AdapterPlan
    resume_dir: Path | None
    resumed: dict[str, Any] | None
    resume_tensors: dict[str, torch.Tensor]
    order: SampleOrder
    total: int
    init: InitPlan
    samples: SamplePlan | None
    val_files: tuple[Path, ...] = ()


def _split(config: TrainConfig, files: tuple[Path, ...], spec: DatasetSpec,
           on_event: OnEvent) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(train files, validation files): a seeded share of the dataset's files, or those of --val-dir."""
    if config.val_split:
        return split_validation(files, config.val_split, config.seed)
    if config.val_dir is not None:
        scan = scan_dataset(config.val_dir, spec)
        for problem in scan.problems:
            on_event(Notice(f"Skipped {problem} (validation)"))
        return files, scan.files
    return files, ()


def _preflight(config: TrainConfig, choice: ModelChoice, on_event: OnEvent,
               explicit: frozenset[str] | None = None) -> _Preflight:
    """Dataset scan, adapter plan (map + warnings), resume state and the output folder; no weights loaded."""
    entry = choice.entry
    spec = DatasetSpec.from_model_config(entry.config)
    scan = scan_dataset(config.dataset_dir, spec)
    for problem in scan.problems:  # samples with nothing to learn from (all-zero mask) are left out, not fatal
        on_event(Notice(f"Skipped {problem}"))
    train_files, val_files = _split(config, scan.files, spec, on_event)
    variant = entry.defaults
    plan = plan_adapter(config, variant.name, variant.is_turbo, int(entry.config["num_hidden_layers"]), explicit)
    clamped = None
    if not plan.adaptive:
        plan, clamped = clamp_ranks(plan, module_shapes(build_transformer(entry.config, "meta").requires_grad_(False)))
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
    order = SampleOrder(train_files, spec, config.batch_size, config.seed, config.max_latent_length,
                        rank=dist.rank, world_size=dist.world_size, cache=cache)
    total = config.max_steps or math.ceil(config.epochs * order.micro_per_epoch / config.grad_accum)
    if resumed is not None:  # "auto" values a resumed run left unset continue as the checkpoint resolved them
        saved = resumed.get("config") or {}
        keep = {k: saved[k] for k in ("lr", "warmup_steps") if getattr(config, k) is None and saved.get(k) is not None}
        config = replace(config, **keep)
    resolved = resolve_auto(config, total, math.ceil(order.micro_per_epoch / config.grad_accum), plan.adaptive,
                            variant.is_turbo, ADVISED_LR)
    config = resolved.config
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
    if clamped is not None and resumed is None:  # said once every check passed, so a refused run stays one sentence
        on_event(Notice(clamped))
    for message in resolved.notices:
        on_event(Notice(message, "info"))
    return _Preflight(config, plan, resume_dir, resumed, resume_tensors, order, total, init, samples, val_files)


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
                   plan: AdapterPlan, resumable: bool = True) -> dict[str, Any]:
    """training_state.pt; final/ gets it without the optimizer, scheduler and RNG (`resumable` False): the
    resumable copy of the last step is checkpoints/step-N."""
    state = {"step": st.step, "epoch": epoch, "loss_ema": st.loss_ema, "config": config.to_json(), "plan": plan.to_json(),
             "effective_batch": effective_batch(config), "resumable": resumable}
    if resumable:
        state |= {"rng": st.rng, "optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
                  "scaler": opt.scaler.state_dict()}
    return state


def _advice(plan: AdapterPlan, is_turbo: bool) -> str:
    if plan.adaptive:
        base = " or train on base" if is_turbo else ""
        return (f"Lower --lr (e.g. {ADVISED_LR}) and check samples early; if the loss keeps spiking, delete "
                f"fisher_map.json or pass --ignore-fisher-map{base}.")
    return "Lower --lr (e.g. by half), keep --max-grad-norm on, and check the dataset; then --resume the checkpoint."


def _run_record(config: TrainConfig, choice: ModelChoice, runtime: Runtime, loaded: LoadedModel,
                plan: AdapterPlan, total: int, pre: _Preflight) -> dict[str, Any]:
    """Everything needed to rerun: the resolved config (absolute paths), the model, the runtime, the data split."""
    dist = distributed.current()
    return {
        "tool": {"name": "sidestep", "version": __version__},
        "started_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "config": config.to_json(),
        "total_steps": total,
        "start_step": pre.resumed["step"] if pre.resumed is not None else 0,
        "resumed_from": None if pre.resume_dir is None else str(Path(pre.resume_dir).absolute()),
        "model": {"name": choice.entry.name, "path": str(Path(choice.entry.path).absolute()),
                  "checkpoint_dir": str(Path(choice.checkpoint_dir).absolute()), "layout": choice.entry.layout.value,
                  "variant": loaded.variant.name, "num_layers": loaded.num_layers, "sources": choice.sources},
        "runtime": {"device": str(runtime.device), "precision": runtime.precision, "dtype": str(runtime.dtype),
                    "gradient_checkpointing": runtime.gradient_checkpointing, "reason": runtime.reason,
                    "processes": dist.world_size, "effective_batch": effective_batch(config)},
        "data": {"train_files": len(pre.order.files), "validation_files": [str(p.absolute()) for p in pre.val_files],
                 "steps_per_epoch": math.ceil(pre.order.micro_per_epoch / config.grad_accum)},
        "adapter": {**plan.to_json(), "overrides": list(plan.overrides)},
        "outputs": {"final": str(saving.final_dir(config.output_dir).absolute()),
                    "checkpoints": str((Path(config.output_dir) / "checkpoints").absolute()),
                    "metrics": str((Path(config.output_dir) / METRICS_FILE).absolute()),
                    "best": str((Path(config.output_dir) / BEST_DIR).absolute()) if pre.val_files else None},
    }
