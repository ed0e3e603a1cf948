"""One benchmark cell: a task × a seed. Analyse the task's train split, build every arm, train each with the
project's own `train()` over the learning-rate sweep, pick the best on validation, report test and forgetting."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from sidestep.analysis.config import AnalysisConfig
from sidestep.analysis.fisher_map import FisherMap, write_map
from sidestep.analysis.run import analyze_dataset, build_map
from sidestep.data import DatasetSpec, dataset_hash, scan_dataset
from sidestep.models import LoadedModel, ModelEntry, Runtime, find_model
from sidestep.models.select import ModelChoice
from sidestep.training.config import TrainConfig
from sidestep.training.run import train
from sidestep.training.adapters import AdapterPlan, attach_adapter, module_shapes
from sidestep.training.config import AVAILABLE_INITS, InitMode
from sidestep.training.events import Notice
from sidestep.training.saving import load_adapter_weights, read_adapter_dir

from .arms import ARM_ORDER, MAP_LR_RATIO, Arm, Budget, control_native, flat_arm, matched_arm, reference_native
from .base_model import MODEL_FOLDER, BaseModel
from .evaluate import EvalSet, eval_loss, make_eval_set
from .synthetic import Shift, draw_samples, shifted_law, write_split

Log = Callable[[str], None]
GRADIENT_ARMS = ("flat_grad", "map_grad")


@dataclass(frozen=True)
class CellConfig:
    budget: Budget
    steps: int
    batch_size: int
    warmup: int
    lrs: tuple[float, ...]
    n_train: int
    n_val: int
    n_test: int
    n_base_eval: int
    eval_draws: int
    rank_signal: str
    arms: tuple[str, ...]
    focus: str = "balanced"  # analysis timestep focus of our maps
    inclusion: float = 0.55  # selection fraction of our maps (the reference arm keeps 0.55)
    probe_repeats: int = 1  # --probe-repeats of our maps' analysis (independent probes averaged)


@dataclass
class Task:
    """A task's files and fixed evaluation sets (shared by every seed and arm, so all differences are paired)."""

    seed: int
    shift: Shift
    train_dir: Path
    val: EvalSet
    test: EvalSet
    base_eval: EvalSet
    base_model_test_loss: float  # the pretrained model on the target test split (before any fine-tuning)
    base_model_base_loss: float  # ... and on held-out base-distribution samples (forgetting reference)


def prepare_task(base: BaseModel, loaded: LoadedModel, task_seed: int, cfg: CellConfig, workdir: Path) -> Task:
    law, shift = shifted_law(base.law, task_seed)
    root = workdir / f"task-{task_seed}"
    train_samples = draw_samples(law, cfg.n_train, 20_000 + 7 * task_seed, "train")
    write_split(root / "train", train_samples)
    val_s = draw_samples(law, cfg.n_val, 30_000 + 7 * task_seed, "val")
    test_s = draw_samples(law, cfg.n_test, 40_000 + 7 * task_seed, "test")
    write_split(root / "val", val_s)
    write_split(root / "test", test_s)
    base_s = draw_samples(base.law, cfg.n_base_eval, 50_000, "heldout")  # same for every task
    v = loaded.variant
    val = make_eval_set(val_s, cfg.eval_draws, v, 1)
    test = make_eval_set(test_s, cfg.eval_draws, v, 2)
    base_eval = make_eval_set(base_s, cfg.eval_draws, v, 3)
    return Task(task_seed, shift, root / "train", val, test, base_eval,
                eval_loss(loaded.transformer, test)[0], eval_loss(loaded.transformer, base_eval)[0])


def run_cell(task: Task, seed: int, base: BaseModel, loaded: LoadedModel, runtime: Runtime, cfg: CellConfig,
             workdir: Path, log: Log) -> tuple[list[dict], dict]:
    """Every arm on one task and seed; returns one record per arm and the cell's analysis info."""
    entry = find_model(base.root, MODEL_FOLDER, None)
    choice = ModelChoice(entry, base.root, {"checkpoint_dir": "bench", "model": "bench"})
    cell = workdir / f"task-{task.seed}" / f"seed-{seed}"
    shapes = module_shapes(loaded.transformer)
    arms, maps, info = _build_arms(task, seed, entry, loaded, runtime, cfg, cell, shapes, log)
    records = []
    for arm in arms:
        arm_cfg = cfg
        if arm.key == "map_flat_product_lr":  # no sweep of its own: flat's choice, as the product would scale it
            flat_lr = next(r["best_lr"] for r in records if r["arm"] == "flat")  # flat always runs first
            arm_cfg = replace(cfg, lrs=(flat_lr * MAP_LR_RATIO,))
        init_file = Path(info["init_file"]) if arm.init == "gradient" and info["init_file"] else None
        folder = (_arm_dataset(cell / arm.key, task.train_dir, maps.get(arm.key), init_file)
                  if not arm.flat or init_file is not None else task.train_dir)
        records.append(_run_arm(arm, folder, task, seed, choice, loaded, runtime, arm_cfg, cell / arm.key, log)
                       | {"analysis_seconds": info["analysis_seconds"] if not arm.flat else 0.0})
    return records, info


def skipped_arms(cfg: CellConfig) -> dict[str, str]:
    if InitMode.GRADIENT in AVAILABLE_INITS:
        return {}
    why = "skipped: --init gradient is not available in this build of train (issue 11)"
    return {key: why for key in GRADIENT_ARMS if key in cfg.arms}


# ---- arms ---------------------------------------------------------------------------------------------


def _build_arms(task: Task, seed: int, entry: ModelEntry, loaded: LoadedModel, runtime: Runtime, cfg: CellConfig,
                cell: Path, shapes: dict, log: Log) -> tuple[list[Arm], dict[str, FisherMap], dict]:
    b = cfg.budget
    acfg = AnalysisConfig(dataset_dir=task.train_dir, output=cell / "analysis" / "fisher_map.json", base_rank=b.base,
                          rank_min=b.lo, rank_max=b.hi, rank_step=b.step, budget="median", alpha_ratio=b.alpha_ratio,
                          rank_signal=cfg.rank_signal, timestep_focus=cfg.focus, inclusion=cfg.inclusion, seed=seed,
                          probe_repeats=cfg.probe_repeats)
    (cell / "analysis").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcome = analyze_dataset(acfg, entry, runtime, loader=lambda _e, _r: loaded)  # the one library entry
    analysis_seconds = time.perf_counter() - started
    scan = scan_dataset(task.train_dir, DatasetSpec.from_model_config(entry.config))
    fb = b.for_flat_maps()  # the flat-budget maps get the product's flat cap, not the median mode's
    flat_map, _ = build_map(replace(acfg, budget="flat", rank_max=b.flat_cap), loaded, outcome.result, scan)
    stats = outcome.result.by_name
    log(f"  analysis {analysis_seconds:.1f}s: median map {len(outcome.map.rank_pattern)} modules, "
        f"flat-budget map {len(flat_map.rank_pattern)} modules")

    flat = flat_arm(shapes, b)
    target = flat.params
    natives = {
        "reference": reference_native({n: s.fisher for n, s in stats.items()},
                                      {n: float(s.weight_rank or 1) for n, s in stats.items()}, b),
        "map_median": outcome.map.rank_pattern,
        "map_flat": flat_map.rank_pattern,
    }
    built: dict[str, Arm] = {"flat": flat, "flat_rslora": flat_arm(shapes, b, key="flat_rslora")}
    for key, native in natives.items():
        built[key] = matched_arm(key, native, shapes, fb if key == "map_flat" else b, target)
    built["map_flat_product_lr"] = replace(built["map_flat"], key="map_flat_product_lr")
    built["control"] = matched_arm("control", control_native(built["map_flat"].ranks, seed), shapes, fb, target,
                                   notes=("ranks of (4) shuffled over the same modules",))
    built["map_flat_rslora"] = matched_arm("map_flat_rslora", natives["map_flat"], shapes, fb, target, rslora=True)
    if InitMode.GRADIENT in AVAILABLE_INITS:  # joins when issue 11 lands
        built["flat_grad"] = flat_arm(shapes, b, key="flat_grad", init="gradient")
        built["map_grad"] = matched_arm("map_grad", natives["map_flat"], shapes, fb, target, init="gradient")
    template = replace(outcome.map, modules=(), created_at="", report=None)
    maps = {key: _arm_map(template, arm, shapes) for key, arm in built.items() if not arm.flat}
    arms = [built[k] for k in ARM_ORDER if k in built and k in cfg.arms]
    info = {"analysis_seconds": analysis_seconds, "flat_params": target,
            "median_map_native_params": outcome.map.trainable_params, "flat_map_native_params": flat_map.trainable_params,
            "flat_map_rank_max": flat_map.rank_max,
            "cross_run_spearman": outcome.result.cross_run_spearman, "arms": [a.describe() for a in arms],
            "init_file": None if outcome.init_path is None else str(outcome.init_path)}
    return arms, maps, info


def _arm_map(template: FisherMap, arm: Arm, shapes: dict) -> FisherMap:
    names = set(arm.ranks)
    return replace(template, rank_pattern=dict(arm.ranks), alpha_pattern=dict(arm.alphas),
                   excluded_modules=tuple(n for n in shapes if n not in names), trainable_params=arm.params,
                   extra={"bench_arm": arm.key})


def _arm_dataset(folder: Path, train_dir: Path, fmap: FisherMap | None, init_file: Path | None = None) -> Path:
    """A dataset folder for one arm: links to the train split's files plus the arm's fisher_map.json (map arms)
    and a link to the analysis' fisher_init.safetensors (gradient-init arms)."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for src in sorted(train_dir.glob("*.pt")):
        link = data / src.name
        if not link.exists():
            link.symlink_to(src.resolve())
    if init_file is not None:
        link = data / (fmap.init.file if fmap is not None and fmap.init is not None else init_file.name)
        if not link.exists():
            link.symlink_to(Path(init_file).resolve())
    if fmap is not None:
        write_map(replace(fmap, dataset_hash=dataset_hash(data)), data / "fisher_map.json")
    return data


# ---- training and evaluation --------------------------------------------------------------------------


def _run_arm(arm: Arm, data: Path, task: Task, seed: int, choice: ModelChoice, loaded: LoadedModel,
             runtime: Runtime, cfg: CellConfig, folder: Path, log: Log) -> dict:
    b = cfg.budget
    flat_alpha = next(iter(arm.alphas.values())) if arm.flat else b.alpha_ratio * b.base
    sweep, best = [], None
    train_seconds = 0.0
    for i, lr in enumerate(cfg.lrs):
        tcfg = TrainConfig(dataset_dir=data, output_dir=folder / f"lr-{i}", rank=b.base, alpha=flat_alpha, lr=lr,
                           max_steps=cfg.steps, batch_size=cfg.batch_size, warmup_steps=cfg.warmup, seed=seed,
                           save_every=0, ignore_fisher_map=arm.flat, overwrite=True, init=arm.init)
        notices: list[str] = []
        started = time.perf_counter()
        out = train(tcfg, choice, runtime, on_event=lambda e: notices.append(e.message) if isinstance(e, Notice) else None)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        if out.trainable_params != arm.params:
            raise RuntimeError(f"{arm.key}: train() trained {out.trainable_params} parameters, the arm counts {arm.params}.")
        run = json.loads(Path(out.run_json).read_text(encoding="utf-8"))
        used = run.get("init", {}).get("mode", "default")
        if used != arm.init:  # a silent fallback would make a gradient-init arm a copy of its default twin
            raise RuntimeError(f"{arm.key}: train() used --init {used}, not {arm.init}: {' '.join(notices)}")
        model = _adapted(loaded.transformer, run, out.final_dir)
        val = eval_loss(model, task.val)[0]
        sweep.append({"lr": lr, "val_loss": val, "train_seconds": seconds, "final_train_loss_ema": out.loss_ema,
                      "notices": notices})
        if best is None or val < best[0]:
            best = (val, lr, model)
        log(f"  {arm.key:16s} lr {lr:.0e}: val {val:.5f} ({seconds:.1f}s)")
    val, lr, model = best
    test, test_by_t = eval_loss(model, task.test)
    base_after, _ = eval_loss(model, task.base_eval)
    return {"arm": arm.key, "label": arm.label, "task_seed": task.seed, "seed": seed, "params": arm.params,
            "native_params": arm.native_params, "modules": len(arm.ranks), "best_lr": lr, "val_loss": val,
            "test_loss": test, "test_loss_by_t": test_by_t, "adaptation": task.base_model_test_loss - test,
            "base_loss_after": base_after, "forgetting": base_after - task.base_model_base_loss,
            "init": arm.init, "train_seconds": train_seconds, "lr_sweep": sweep}


def _adapted(base: torch.nn.Module, run: dict, final_dir: Path) -> torch.nn.Module:
    """A copy of the pretrained model with the saved adapter loaded back exactly as train() planned it (run.json)."""
    model = copy.deepcopy(base)
    plan = AdapterPlan.from_json(run["adapter"])
    attach_adapter(model, plan)
    load_adapter_weights(model, read_adapter_dir(final_dir).tensors)
    return model.eval()
