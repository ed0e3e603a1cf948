"""One planted-benchmark cell (a plant × a training seed): analyse the data on the planted base, build every arm at
the flat parameter count, train each with the project's own `train()` over the LR sweep (chosen on validation),
and measure the relative distillation error against the teacher, the flow-matching test loss and forgetting."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from sidestep.analysis.config import AnalysisConfig, RankSignal
from sidestep.analysis.fisher_map import FisherMap, concentrations
from sidestep.analysis.run import analyze_dataset, build_map, signal_scores, with_probe
from sidestep.data import DatasetSpec, scan_dataset
from sidestep.data.dataset import collate
from sidestep.models import LoadedModel, find_model
from sidestep.models.select import ModelChoice
from sidestep.training.adapters import module_shapes
from sidestep.training.config import TrainConfig
from sidestep.training.run import train

from quality_lib.allocation import permuted, reference_ranks, scattered
from quality_lib.arms import Arm, Budget, flat_arm, matched_arm
from quality_lib.base_model import MODEL_FOLDER
from quality_lib.evaluate import EvalSet, eval_loss
from quality_lib.runner import _adapted, _arm_dataset, _arm_map

from .plant import Plant

Log = Callable[[str], None]
SIGNALS = tuple(s.value for s in RankSignal)
DEFAULT_SIGNAL = AnalysisConfig(dataset_dir=Path(".")).rank_signal.value


@dataclass(frozen=True)
class CellConfig:
    budget: Budget
    steps: int
    batch_size: int
    warmup: int
    lrs: tuple[float, ...]
    signals: tuple[str, ...] = SIGNALS
    arms: tuple[str, ...] | None = None  # train only these arms (flat always); None = all
    probe_lr: float | None = None  # --rank-signal probe at another LR than the tool's default; None = the default
    probe_repeats: int = 1  # --probe-repeats: independent probes averaged


@dataclass
class Data:
    """The dataset folder and the fixed evaluation inputs of one plant (shared by every seed and arm)."""

    train_dir: Path
    val: EvalSet
    test: EvalSet
    other: EvalSet  # another law the base knows: forgetting


@torch.no_grad()
def outputs(model: torch.nn.Module, data: EvalSet) -> list[torch.Tensor]:
    """The model's velocity predictions on every (sample, fixed t, fixed noise) input."""
    model.eval()
    out = []
    for sample, noise in zip(data.samples, data.noise):
        batch = collate([sample] * data.draws)
        x0, tt = batch.target_latents, data.t.view(-1, 1, 1)
        x_t = tt * noise + (1 - tt) * x0
        out.append(model(hidden_states=x_t, timestep=data.t, timestep_r=data.t,
                         encoder_hidden_states=batch.encoder_hidden_states,
                         context_latents=batch.context_latents).sample.float())
    return out


def distill_error(pred: list[torch.Tensor], teacher: list[torch.Tensor], base: list[torch.Tensor]) -> float:
    """Σ||f − f_T||² / Σ||f_B − f_T||²: 1 = the planted base, 0 = the teacher (noise-free: fixed inputs)."""
    num = sum(float((p - t).square().sum()) for p, t in zip(pred, teacher))
    den = sum(float((b - t).square().sum()) for b, t in zip(base, teacher))
    return num / den


def run_cell(plant: Plant, seed: int, data: Data, loaded: LoadedModel, teacher_out: dict, base_out: dict,
             runtime, cfg: CellConfig, workdir: Path, log: Log) -> tuple[list[dict], dict]:
    entry = find_model(plant.root, MODEL_FOLDER, None)
    choice = ModelChoice(entry, plant.root, {"checkpoint_dir": "bench", "model": "bench"})
    cell = workdir / f"plant-{plant.spec.seed}" / f"seed-{seed}"
    shapes = module_shapes(loaded.transformer)
    b = cfg.budget
    fb = b.for_flat_maps()
    acfg = AnalysisConfig(dataset_dir=data.train_dir, output=cell / "analysis" / "fisher_map.json", base_rank=b.base,
                          rank_min=b.lo, rank_max=b.hi, rank_step=b.step, budget="flat", alpha_ratio=b.alpha_ratio,
                          seed=seed, write_init=False, probe_repeats=cfg.probe_repeats)
    (cell / "analysis").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcome = analyze_dataset(acfg, entry, runtime, loader=lambda _e, _r: loaded)
    analysis_seconds = time.perf_counter() - started
    scan = scan_dataset(data.train_dir, DatasetSpec.from_model_config(entry.config))
    result = outcome.result
    planted = set(plant.ranks)
    with_partners = planted | {mlp_partner(n) for n in planted}

    flat = flat_arm(shapes, b)
    target = flat.params
    arms: dict[str, Arm] = {"flat": flat}
    arms["oracle"] = matched_arm("oracle", _scaled(plant.ranks, target, shapes), shapes, b, target)
    arms["oracle_sibling"] = matched_arm("oracle_sibling", _scaled(_mlp_siblings(plant.ranks), target, shapes), shapes,
                                         b, target, notes=("the oracle with each planted MLP gate/up moved to its partner",))
    arms["oracle_control"] = matched_arm("oracle_control", permuted(arms["oracle"].ranks, seed), shapes, b, target,
                                         notes=("ranks of the oracle shuffled over the planted modules",))
    arms["planted_equal"] = matched_arm("planted_equal", _scaled(dict.fromkeys(plant.ranks, 1), target, shapes),
                                        shapes, b, target)
    if RankSignal.PROBE.value in cfg.signals and (result.probe is None or cfg.probe_lr is not None):
        probe_cfg = replace(acfg, rank_signal=RankSignal.PROBE, probe_lr=cfg.probe_lr or acfg.probe_lr)
        result = with_probe(probe_cfg, loaded, result, scan)
    if result.probe is not None:  # the probe is a training run of its own, charged separately
        log(f"  probe {result.probe.seconds:.1f}s at lr {result.probe.lr_used:g}")
    precision, partner_precision, mlp_precision, maps = {}, {}, {}, {}
    for signal in cfg.signals:
        # the analysis keeps --rank-max's sketch width; only the maps stop at the flat budget's cap
        fmap, _ = build_map(replace(acfg, rank_signal=signal, rank_max=b.flat_cap), loaded, result, scan)
        maps[signal] = fmap
        arms[f"map_{signal}"] = matched_arm(f"map_{signal}", fmap.rank_pattern, shapes, fb, target)
        scores = signal_scores(RankSignal(signal), result)
        top = sorted(scores, key=lambda n: (-scores[n], n))[: len(planted)]
        precision[signal] = len(planted & set(top)) / len(planted)
        partner_precision[signal] = sum(n in top or mlp_partner(n) in top for n in planted) / len(planted)
        named_mlps = {mlp_of(n) for n in top} - {None}
        mlp_precision[signal] = sum(n in top or mlp_of(n) in named_mlps for n in planted) / len(planted)
    median_map, _ = build_map(replace(acfg, rank_signal=DEFAULT_SIGNAL, budget="median"), loaded, result, scan)
    arms["map_median"] = matched_arm("map_median", median_map.rank_pattern, shapes, b, target,
                                     notes=(f"the default map under --budget median ({median_map.trainable_params} "
                                            "parameters), rescaled to the flat budget",))
    stats = result.by_name
    arms["reference"] = matched_arm("reference", reference_ranks({n: s.fisher for n, s in stats.items()},
                                                                 {n: float(s.weight_rank or 1) for n, s in stats.items()},
                                                                 b.base, b.lo, b.hi, b.step), shapes, b, target)
    default_signal = DEFAULT_SIGNAL if DEFAULT_SIGNAL in maps else cfg.signals[0]  # the map the controls shuffle
    default = arms[f"map_{default_signal}"]
    arms["control"] = matched_arm("control", permuted(default.ranks, seed), shapes, fb, target,
                                  notes=("ranks of the default map shuffled over the same modules",))
    arms["control_anywhere"] = matched_arm("control_anywhere", scattered(default.ranks, list(shapes), seed), shapes,
                                           fb, target, notes=("ranks of the default map on randomly drawn modules",))
    info = {"plant": plant.spec.seed, "seed": seed, "analysis_seconds": analysis_seconds, "flat_params": target,
            "probe_seconds": result.probe.seconds if result.probe is not None else None,
            "precision_top_S": precision, "precision_top_S_with_partner": partner_precision,
            "precision_top_S_same_mlp": mlp_precision,
            "concentration": concentration_record(outcome.map),
            "map_rank_max": maps[default_signal].rank_max,
            "map_params": {n: default.ranks.get(n, 0) * (shapes[n].in_features + shapes[n].out_features) for n in shapes},
            "arms": {k: {"params": a.params, "modules": len(a.ranks),
                         "planted_param_share": _planted_share(a, planted, shapes),
                         "planted_or_partner_param_share": _planted_share(a, with_partners, shapes),
                         "planted_recall": len(planted & set(a.ranks)) / len(planted), "notes": list(a.notes)}
                     for k, a in arms.items()}}
    log(f"  analysis {analysis_seconds:.1f}s; precision@|S| " + ", ".join(f"{k} {v:.2f}" for k, v in precision.items()))
    records = []
    template = replace(outcome.map, modules=(), created_at="", report=None, extra={})
    for key, arm in arms.items():
        if cfg.arms is not None and key != "flat" and key not in cfg.arms:
            continue
        folder = data.train_dir if arm.flat else _arm_dataset(cell / key, data.train_dir, _arm_map(template, arm, shapes))
        records.append(_train_arm(key, arm, folder, data, seed, choice, loaded, runtime, cfg, cell / key,
                                  teacher_out, base_out, log) | {"plant": plant.spec.seed})
    return records, info


def concentration_record(fmap: FisherMap) -> dict[str, dict]:
    """Per measure the map records (probe, need): its top-10% share and per-module value per parameter; for the
    probe also the share of the base's evaluation loss its training removed (how much the data asks at all)."""
    record = {}
    for field, c in concentrations(fmap).items():
        record[field] = {"top10_share": c.top10_share, "per_param": dict(c.per_module)}
        if c.loss_fall is not None:
            record[field]["relative_fall"] = c.loss_fall
    return record


def _scaled(weights: dict[str, int], target: int, shapes) -> dict[str, int]:
    """Ranks proportional to `weights` whose parameter count is near `target` (matched exactly afterwards)."""
    unit = sum(w * (shapes[n].in_features + shapes[n].out_features) for n, w in weights.items())
    return {n: max(1, round(w * target / unit)) for n, w in weights.items()}


def mlp_partner(name: str) -> str:
    """The other input projection of the same MLP for a gate or up projection (h = silu(gate x) ⊙ up x, so either
    can rescale what the other got wrong); the name itself for every other module."""
    for a, b in (("mlp.gate_proj", "mlp.up_proj"), ("mlp.up_proj", "mlp.gate_proj")):
        if name.endswith(a):
            return name[: -len(a)] + b
    return name


def mlp_of(name: str) -> str | None:
    """The MLP a gate, up or down projection belongs to (`layers.3.mlp`); None for attention. The probe's misses
    are projections of a planted MLP that repair its change through another projection (docs/data-awareness.md)."""
    prefix, _, leaf = name.rpartition(".")
    return prefix if prefix.endswith(".mlp") and leaf in ("gate_proj", "up_proj", "down_proj") else None


def _mlp_siblings(ranks: dict[str, int]) -> dict[str, int]:
    """The planted ranks with every MLP gate/up projection moved to its partner; kept where the partner is planted
    too."""
    return {(n if mlp_partner(n) in ranks else mlp_partner(n)): r for n, r in ranks.items()}


def _planted_share(arm: Arm, planted: set[str], shapes) -> float:
    on = sum(r * (shapes[n].in_features + shapes[n].out_features) for n, r in arm.ranks.items() if n in planted)
    return on / arm.params


def _train_arm(key: str, arm: Arm, folder: Path, data: Data, seed: int, choice, loaded: LoadedModel, runtime,
               cfg: CellConfig, out: Path, teacher_out: dict, base_out: dict, log: Log) -> dict:
    b = cfg.budget
    alpha = b.alpha_ratio * b.base
    best, sweep = None, []
    for i, lr in enumerate(cfg.lrs):
        tcfg = TrainConfig(dataset_dir=folder, output_dir=out / f"lr-{i}", rank=b.base, alpha=alpha, lr=lr,
                           max_steps=cfg.steps, batch_size=cfg.batch_size, warmup_steps=cfg.warmup, seed=seed,
                           save_every=0, ignore_fisher_map=arm.flat, overwrite=True)
        started = time.perf_counter()
        result = train(tcfg, choice, runtime)
        if result.trainable_params != arm.params:
            raise RuntimeError(f"{key}: train() trained {result.trainable_params} parameters, the arm counts {arm.params}.")
        model = _adapted(loaded.transformer, json.loads(Path(result.run_json).read_text()), result.final_dir)
        val = distill_error(outputs(model, data.val), teacher_out["val"], base_out["val"])
        sweep.append({"lr": lr, "val_distill": val, "seconds": time.perf_counter() - started})
        log(f"  {key:18s} lr {lr:.0e}: val distill {val:.4f}")
        if best is None or val < best[0]:
            best = (val, lr, model)
    val, lr, model = best
    return {"arm": key, "seed": seed, "params": arm.params, "modules": len(arm.ranks), "best_lr": lr,
            "val_distill": val, "distill": distill_error(outputs(model, data.test), teacher_out["test"], base_out["test"]),
            "test_loss": eval_loss(model, data.test)[0], "forgetting": eval_loss(model, data.other)[0] - base_out["other_loss"],
            "lr_sweep": sweep}
