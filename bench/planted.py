"""Planted benchmark: does the map put the adapter where the data needs change? (issue 18)

A base model carries a known, concentrated, high-rank change in |S| planted modules (bench/planted_lib/plant.py:
the pretrained tiny DiT with calibrated random rank-16..48 changes; the teacher is the unchanged model and the
dataset is drawn from the law it was pretrained on, so the teacher is consistent with its data). Every arm is
fine-tuned with the project's own `train()` at the parameter count of flat LoRA (±1%), and judged by the relative
distillation error against the teacher on fixed seeded inputs (1 = the planted base, 0 = the teacher), next to
the flow-matching test loss and forgetting (loss change on another law). Arms: flat; oracle (the planted modules,
ranks ∝ true ranks); planted modules at equal ranks; our map for each --rank-signal (--budget flat); the
reference (Side-Step) rule; the random-permutation control of the default map, and its ranks on randomly drawn
modules. The LR is chosen on validation. The oracle arms may reach --rank-max (64); the maps, analysed under
--budget flat, get --flat-rank-max, by default 4 × --rank as `sidestep analyze --budget flat` does.

    python bench/planted.py                 # default: plants 0-3 × seeds 0,1 (n = 8 paired cells)
    python bench/planted.py --quick         # CI smoke (tiny sizes, one cell, one LR)

stdout: one JSON line per arm × cell, then one summary JSON line; --out FILE writes everything, --markdown the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_lib.control import own_samples  # noqa: E402
from planted_lib.plant import PlantSpec, ensure_plant  # noqa: E402
from planted_lib.runner import (DEFAULT_SIGNAL, SIGNALS, CellConfig, Data, concentration_record, outputs,  # noqa: E402
                                run_cell)
from quality_lib.arms import Budget  # noqa: E402
from quality_lib.base_model import MODEL_FOLDER, BaseSpec, ensure_base  # noqa: E402
from quality_lib.cli import finish, parse_with_preset  # noqa: E402
from quality_lib.evaluate import eval_loss, make_eval_set  # noqa: E402
from quality_lib.stats import mean_std, paired, ratio_of_means  # noqa: E402
from quality_lib.synthetic import draw_samples, shifted_law, write_split  # noqa: E402

from sidestep.analysis.config import AnalysisConfig  # noqa: E402
from sidestep.analysis.run import analyze_dataset  # noqa: E402
from sidestep.models import find_model, load_model, resolve_runtime  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    "default": dict(plants="0,1,2,3", seeds=2, layers=4, hidden=128, pretrain_steps=1500, train_samples=24,
                    eval_samples=8, eval_draws=4, steps=300, batch_size=4, warmup=20, lrs="3e-3,1e-2", rank=4,
                    rank_min=1, rank_max=64, rank_step=1, damage=0.012, max_scale=3.0, ode_steps=20),
    "quick": dict(plants="0", seeds=1, layers=2, hidden=64, pretrain_steps=100, train_samples=8, eval_samples=3,
                  eval_draws=2, steps=6, batch_size=2, warmup=1, lrs="1e-3", rank=4, rank_min=1, rank_max=32,
                  rank_step=1, damage=0.002, max_scale=2.0, ode_steps=4),
}
ARM_LABELS = {"flat": "flat LoRA, all targets", "oracle": "oracle: planted modules, ranks ∝ true ranks",
              "oracle_sibling": "oracle with planted MLP gate/up moved to the partner",
              "planted_equal": "planted modules, equal ranks", "reference": "reference rule (Side-Step)",
              "oracle_control": "control: the oracle's ranks permuted over the planted modules",
              "map_median": f"our map, --budget median, rescaled to the flat budget ({DEFAULT_SIGNAL})",
              "control": f"control: permuted map ({DEFAULT_SIGNAL})",
              "control_anywhere": f"control: the map's ranks on random modules ({DEFAULT_SIGNAL})",
              **{f"map_{s}": f"our map, --rank-signal {s}" + (" (default)" if s == DEFAULT_SIGNAL else "")
                 for s in SIGNALS}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke preset")
    p.add_argument("--plants", default=None, help="plant seeds, comma-separated (default 0,1,2,3)")
    p.add_argument("--plant-seed", default=None, help="alias of --plants")
    p.add_argument("--signals", default=",".join(SIGNALS), help="rank signals to build map arms for")
    p.add_argument("--arms", default=None, help="train only these arms (comma-separated; flat always); default all")
    p.add_argument("--probe-lr", type=float, default=None, help="learning rate of the --rank-signal probe run "
                   "(default: the tool's default)")
    p.add_argument("--probe-repeats", type=int, default=1, help="independent probes averaged (the tool's "
                   "--probe-repeats; default 1, the tool's default)")
    p.add_argument("--skip-control-analysis", action="store_true", help="skip the own-samples analysis")
    p.add_argument("--out", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--cache", type=Path, default=REPO / ".bench-cache" / "quality")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--threads", type=int, default=1)
    sizes = {"seeds": int, "layers": int, "hidden": int, "pretrain-steps": int, "train-samples": int,
             "eval-samples": int, "eval-draws": int, "steps": int, "batch-size": int, "warmup": int, "lrs": str,
             "rank": int, "rank-min": int, "rank-max": int, "rank-step": int, "flat-rank-max": int, "damage": float,
             "max-scale": float, "ode-steps": int}
    args = parse_with_preset(p, sizes, PRESETS, argv)
    if args.plant_seed:  # the alias, when given, names the plants
        args.plants = args.plant_seed
    return args


def main(argv: list[str] | None = None, emit=print) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    runtime = resolve_runtime("cpu", "fp32", False)
    spec = BaseSpec(num_layers=args.layers, hidden=args.hidden, steps=args.pretrain_steps)
    base = ensure_base(args.cache, spec, log)
    teacher = load_model(find_model(base.root, MODEL_FOLDER, None), runtime)
    budget = Budget(args.rank, args.rank_min, args.rank_max, args.rank_step, flat_hi=args.flat_rank_max)
    cfg = CellConfig(budget, args.steps, args.batch_size, args.warmup, tuple(float(x) for x in args.lrs.split(",")),
                     tuple(args.signals.split(",")), tuple(args.arms.split(",")) if args.arms else None, args.probe_lr,
                     args.probe_repeats)
    records, cells, plants, controls = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="sidestep-planted-") as tmp:
        workdir = args.workdir or Path(tmp)
        for plant_seed in (int(x) for x in args.plants.split(",")):
            plant = ensure_plant(base, teacher.transformer, args.layers, teacher.variant,
                                 PlantSpec(plant_seed, damage=args.damage, max_scale=args.max_scale), args.cache.parent / "planted", log)
            loaded = load_model(find_model(plant.root, MODEL_FOLDER, None), runtime)
            v = loaded.variant
            root = workdir / f"plant-{plant_seed}"
            train_samples = draw_samples(base.law, args.train_samples, 20_000 + plant_seed, "train")
            write_split(root / "train", train_samples)
            other_law, _ = shifted_law(base.law, 500)
            data = Data(root / "train",
                        make_eval_set(draw_samples(base.law, args.eval_samples, 30_000 + plant_seed, "val"), args.eval_draws, v, 1),
                        make_eval_set(draw_samples(base.law, args.eval_samples, 40_000 + plant_seed, "test"), args.eval_draws, v, 2),
                        make_eval_set(draw_samples(other_law, args.eval_samples, 50_000, "other"), args.eval_draws, v, 3))
            t_out = {"val": outputs(teacher.transformer, data.val), "test": outputs(teacher.transformer, data.test)}
            b_out = {"val": outputs(loaded.transformer, data.val), "test": outputs(loaded.transformer, data.test),
                     "other_loss": eval_loss(loaded.transformer, data.other)[0]}
            plants.append(plant.describe() | {"base_test_loss": eval_loss(loaded.transformer, data.test)[0],
                                              "teacher_test_loss": eval_loss(teacher.transformer, data.test)[0]})
            log(f"plant {plant_seed}: {plant.describe()}")
            for seed in range(args.seeds):
                log(f"plant {plant_seed}, seed {seed}")
                recs, info = run_cell(plant, seed, data, loaded, t_out, b_out, runtime, cfg, workdir, log)
                for rec in recs:
                    emit(json.dumps(rec))
                records.extend(recs)
                cells.append(info)
            if not args.skip_control_analysis:
                controls.append(_own_sample_control(loaded, train_samples, root, args, cfg, runtime)
                                | _teacher_control(teacher, root, cfg, runtime))
    summary = summarize(records, cells, plants, controls)
    summary.update({"summary": True, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "wall_seconds": time.perf_counter() - started})
    return finish(summary, records, cells, args, emit, log,
                  lambda: markdown(summary, "python bench/planted.py " + " ".join(argv or sys.argv[1:])))


def _own_sample_control(loaded, conditions, root: Path, args, cfg: CellConfig, runtime) -> dict:
    """The analysis on samples drawn from the planted base itself: how concentrated is the need there?"""
    folder = root / "own"
    write_split(folder, own_samples(loaded.transformer, conditions, args.ode_steps, 1))
    return {"concentration": _control_analysis(loaded, folder, root / "own-map.json", cfg, runtime)}


def _teacher_control(teacher, root: Path, cfg: CellConfig, runtime) -> dict:
    """The analysis of the teacher on the same training data: a model that already generates this law, so the
    data asks it for no change. Its measure must be less concentrated, and its loss fall smaller, than the
    planted base's."""
    return {"teacher": _control_analysis(teacher, root / "train", root / "teacher-map.json", cfg, runtime)}


def _control_analysis(loaded, folder: Path, output: Path, cfg: CellConfig, runtime) -> dict:
    """The default analysis (seed 0, flat budget) of `loaded` on `folder`: what the map's measures record."""
    b = cfg.budget
    acfg = AnalysisConfig(dataset_dir=folder, output=output, base_rank=b.base, rank_min=b.lo, rank_max=b.hi,
                          rank_step=b.step, budget="flat", write_init=False, seed=0, probe_repeats=cfg.probe_repeats)
    outcome = analyze_dataset(acfg, loaded.entry, runtime, loader=lambda _e, _r: loaded)
    return concentration_record(outcome.map)


def summarize(records: list[dict], cells: list[dict], plants: list[dict], controls: list[dict]) -> dict:
    by_arm: dict[str, list[dict]] = {}
    for rec in records:
        by_arm.setdefault(rec["arm"], []).append(rec)
    key = lambda r: (r["plant"], r["seed"])  # noqa: E731
    flat = {key(r): r for r in by_arm["flat"]}
    oracle = {key(r): r for r in by_arm.get("oracle", [])}
    runs = {name: {key(r): r for r in by_arm.get(name, [])} for name in ("control", "control_anywhere", "oracle_control")}
    arms, verdicts = {}, []
    for arm, recs in by_arm.items():
        row = {"label": ARM_LABELS.get(arm, arm), "n": len(recs), "params": sorted({r["params"] for r in recs})}
        for metric in ("distill", "test_loss", "forgetting"):
            row[metric] = mean_std([r[metric] for r in recs])
            if arm != "flat":
                row[f"{metric}_vs_flat"] = paired([r[metric] - flat[key(r)][metric] for r in recs])
        if arm not in ("flat", "oracle") and oracle:
            paired_cells = [r for r in recs if key(r) in oracle]
            share = ratio_of_means([flat[key(r)]["distill"] - r["distill"] for r in paired_cells],
                                   [flat[key(r)]["distill"] - oracle[key(r)]["distill"] for r in paired_cells])
            row["oracle_gain_share"] = share["ratio"]
            row["oracle_gain_share_ci95"] = share["ci95_boot"]
        for name, other in _controls_of(arm, runs).items():
            if other:
                row[f"distill_vs_{name}"] = paired([r["distill"] - other[key(r)]["distill"] for r in recs])
        arms[arm] = row
        for metric in ("distill", "forgetting"):
            stat = row.get(f"{metric}_vs_flat")
            if stat and stat["ci95_t"]:
                lo, hi = stat["ci95_t"]
                word = "better" if hi < 0 else "worse" if lo > 0 else "no significant difference from"
                verdicts.append(f"{arm} vs flat, {metric}: {stat['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] n={stat['n']}: {word}"
                                f"{'' if word.startswith('no') else ' than'} flat")
    signals = sorted({s for c in cells for s in c["precision_top_S"]})
    precision = {s: statistics.fmean(c["precision_top_S"][s] for c in cells) for s in signals}
    partner = {s: statistics.fmean(c["precision_top_S_with_partner"][s] for c in cells) for s in signals}
    same_mlp = {s: statistics.fmean(c["precision_top_S_same_mlp"][s] for c in cells) for s in signals}
    differential, agreement = _differential(cells, controls), map_agreement(cells)
    return {"arms": arms, "precision_top_S": precision, "precision_top_S_with_partner": partner,
            "precision_top_S_same_mlp": same_mlp, "plants": plants,
            "differential_control": differential, "map_agreement": agreement,
            "acceptance": acceptance(arms, precision, partner, differential.get(DEFAULT_SIGNAL), agreement, same_mlp),
            "verdicts": verdicts}


def acceptance(arms: dict[str, dict], precision: dict[str, float], partner: dict[str, float],
               differential: dict | None = None, agreement: dict[str, list[float]] | None = None,
               same_mlp: dict[str, float] | None = None) -> dict[str, bool | None]:
    """Issue 18's criteria for the default map, each True/False, or None when this run lacks the arms to say.

    "Outside the CI" means the paired 95% t interval excludes 0. Two readings of the permutation control are
    reported: over the map's own modules (`control`) and over every target (`control_anywhere`); the oracle
    against its own permutation says whether the first can tell good allocation from bad on this task. The
    differential control (`differential`: the default measure's entry of the summary's `differential_control`;
    `agreement`: `map_agreement`) is read on the scores, as the issue states it, and on the maps themselves.
    """
    def every(values: list[float] | None, test) -> bool | None:
        return None if not values else all(test(v) for v in values)

    def interval(arm: str, field: str) -> list[float] | None:
        return (arms.get(arm, {}).get(field) or {}).get("ci95_t")

    def below_zero(arm: str, field: str) -> bool | None:
        ci = interval(arm, field)
        return None if not ci else ci[1] < 0

    def not_above_zero(arm: str, field: str) -> bool | None:
        ci = interval(arm, field)
        return None if not ci else ci[0] <= 0

    default = f"map_{DEFAULT_SIGNAL}"
    share = arms.get(default, {}).get("oracle_gain_share")
    d, a = differential or {}, agreement or {}
    return {
        "oracle_beats_flat": below_zero("oracle", "distill_vs_flat"),
        "map_recovers_70pct_of_the_oracle_gain": None if share is None else share >= 0.70,
        "map_beats_flat": below_zero(default, "distill_vs_flat"),
        "map_beats_its_permutation_over_its_modules": below_zero(default, "distill_vs_control"),
        "map_beats_its_permutation_over_every_target": below_zero(default, "distill_vs_control_anywhere"),
        "oracle_beats_its_own_permutation": below_zero("oracle", "distill_vs_control"),
        "precision_at_least_0.8": None if DEFAULT_SIGNAL not in precision else precision[DEFAULT_SIGNAL] >= 0.8,
        "precision_with_partners_at_least_0.8": None if DEFAULT_SIGNAL not in partner else partner[DEFAULT_SIGNAL] >= 0.8,
        "precision_same_mlp_at_least_0.8": (
            None if DEFAULT_SIGNAL not in (same_mlp or {}) else same_mlp[DEFAULT_SIGNAL] >= 0.8),
        "map_forgets_no_more_than_flat": not_above_zero(default, "forgetting_vs_flat"),
        "own_samples_less_concentrated_than_every_plant": (
            None if not d.get("own_samples_top10_share") else d["own_below_every_planted"]),
        "two_seeds_agree_at_least_0.95": every(d.get("spearman_same_data_two_seeds"), lambda v: v >= 0.95),
        "two_plants_differ_at_most_0.5": every(d.get("spearman_two_plants"), lambda v: v <= 0.5),
        "two_seeds_maps_agree_at_least_0.95": every(a.get("spearman_two_seeds"), lambda v: v >= 0.95),
        "two_plants_maps_differ_at_most_0.5": every(a.get("spearman_two_plants"), lambda v: v <= 0.5),
        "teacher_loss_fall_below_every_plant": (
            d.get("teacher_fall_below_every_planted") if d.get("relative_fall", {}).get("teacher") else None),
    }


def map_agreement(cells: list[dict]) -> dict[str, list[float]]:
    """How alike the default maps themselves are (what the user trains), for two seeds of the same data and for
    two plants: the share of the parameter budget they put on the same modules, Σ min(p, q) / Σ p over each
    module's parameters, and the Spearman of those parameters over every target (0 where not adapted)."""
    def overlap(a: dict, b: dict) -> float:
        return sum(min(a[n], b[n]) for n in a) / sum(a.values())
    by_plant: dict[int, list[dict]] = {}
    for c in cells:
        if "map_params" in c:  # runs recorded before the field was added have none
            by_plant.setdefault(c["plant"], []).append(c["map_params"])
    pairs = {"two_seeds": [(v[0], v[1]) for v in by_plant.values() if len(v) > 1],
             "two_plants": [(a[0], b[0]) for i, a in enumerate(by_plant.values())
                            for b in list(by_plant.values())[i + 1:]]}
    return {f"{what}_{kind}": [f(a, b) for a, b in found] for kind, found in pairs.items()
            for what, f in (("budget_shared", overlap), ("spearman", _spearman))}


def _controls_of(arm: str, runs: dict[str, dict]) -> dict[str, dict]:
    """The control runs an arm is judged against. Every map against the default map's two controls; the oracle
    against its own permutation, which says whether a permutation control can tell good sizing from bad on this
    task at all."""
    if arm == "oracle":
        return {"control": runs["oracle_control"]}
    if arm.startswith("map_"):
        return {name: runs[name] for name in ("control", "control_anywhere")}
    return {}


def _differential(cells: list[dict], controls: list[dict]) -> dict:
    """Per measure (the probe's score, the need): concentration on planted data vs on the base's own samples, and
    agreement across seeds of the same data and across plants."""
    by_plant: dict[int, list[dict]] = {}
    for c in cells:
        by_plant.setdefault(c["plant"], []).append(c)
    out = {}
    for field in sorted({f for c in cells for f in c["concentration"]}):
        of = lambda c: c["concentration"].get(field, {})  # noqa: E731
        same = [_spearman(of(v[0])["per_param"], of(v[1])["per_param"]) for v in by_plant.values() if len(v) > 1]
        firsts = [of(v[0])["per_param"] for v in by_plant.values()]
        across = [_spearman(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:]]
        owns = [of(c) for c in controls if of(c)]
        teachers = [c["teacher"][field] for c in controls if field in c.get("teacher", {})]
        planted_share = [of(c)["top10_share"] for c in cells]
        own_share = [r["top10_share"] for r in owns]
        teacher_share = [r["top10_share"] for r in teachers]
        out[field] = {"planted_top10_share": planted_share, "own_samples_top10_share": own_share,
                      "own_below_every_planted": _below_every(own_share, planted_share),
                      "teacher_top10_share": teacher_share,
                      "teacher_below_every_planted": _below_every(teacher_share, planted_share),
                      "spearman_same_data_two_seeds": same, "spearman_two_plants": across}
        falls = {"planted": [of(c).get("relative_fall") for c in cells],
                 "own_samples": [r.get("relative_fall") for r in owns],
                 "teacher": [r.get("relative_fall") for r in teachers]}
        if all(v is not None for values in falls.values() for v in values) and falls["planted"]:
            out[field]["relative_fall"] = falls
            out[field]["teacher_fall_below_every_planted"] = _below_every(falls["teacher"], falls["planted"])
    return out


def _spearman(a: dict, b: dict) -> float:
    """Spearman correlation of two per-module mappings over the same names."""
    names = sorted(a)
    return float(spearmanr([a[n] for n in names], [b[n] for n in names])[0])


def _below_every(values: list[float], planted: list[float]) -> bool:
    """True when there are control values and all of them lie below the smallest planted one."""
    return bool(values) and max(values) < min(planted)


def markdown(summary: dict, command: str) -> str:
    def ci(stat: dict | None) -> str:
        if not stat:
            return "—"
        if not stat.get("ci95_t"):
            return f"{stat['mean']:+.4f}"
        lo, hi = stat["ci95_t"]
        return f"{stat['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    lines = [f"Command: `{command}`", "",
             "| arm | params | distill error (mean ± std) | Δ distill vs flat [95% CI] | share of oracle gain [95% CI] | "
             "Δ test loss vs flat | Δ forgetting vs flat | Δ distill vs control | Δ distill vs its ranks on random modules |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, row in summary["arms"].items():
        d = row["distill"]
        share, share_ci = row.get("oracle_gain_share"), row.get("oracle_gain_share_ci95")
        share_text = "—" if share is None else f"{share:.0%}" + (f" [{share_ci[0]:.0%}, {share_ci[1]:.0%}]" if share_ci else "")
        lines.append(f"| {row['label']} | {'/'.join(map(str, row['params']))} | {d['mean']:.4f} ± {d['std']:.4f} | "
                     f"{ci(row.get('distill_vs_flat'))} | {share_text} | "
                     f"{ci(row.get('test_loss_vs_flat'))} | {ci(row.get('forgetting_vs_flat'))} | "
                     f"{ci(row.get('distill_vs_control'))} | {ci(row.get('distill_vs_control_anywhere'))} |")
    def span(values: list[float]) -> str:
        return f"{min(values):.2f}–{max(values):.2f}" if values else "—"
    lines += ["", "Precision of the planted modules among each signal's top-|S|: " +
              ", ".join(f"{k} {v:.2f}" for k, v in summary["precision_top_S"].items()), "",
              "The same, counting a planted MLP gate or up projection as found when its partner is in the top-|S| "
              "(the oracle with those moved to the partner is the arm `oracle_sibling`): " +
              ", ".join(f"{k} {v:.2f}" for k, v in summary["precision_top_S_with_partner"].items()),
              "",
              "The same, counting a planted MLP projection as found when any projection of its MLP is in the top-|S| "
              "(the probe's misses repair the planted MLP through another of its projections): " +
              ", ".join(f"{k} {v:.2f}" for k, v in summary["precision_top_S_same_mlp"].items()),
              "",
              "Differential control (targets: own samples below every planted share; two seeds ≥ 0.95; two plants "
              "≤ 0.5; and the teacher, which needs no change, below every planted share):", "",
              "| measure | top-10% share, planted | top-10% share, own samples | own below every planted | "
              "top-10% share, teacher | teacher below every planted | Spearman, two seeds | Spearman, two plants |",
              "|---|---|---|---|---|---|---|---|"]
    for field, d in summary["differential_control"].items():
        lines.append(f"| {field} | {span(d['planted_top10_share'])} | {span(d['own_samples_top10_share'])} | "
                     f"{'yes' if d['own_below_every_planted'] else 'no'} | {span(d['teacher_top10_share'])} | "
                     f"{'yes' if d['teacher_below_every_planted'] else 'no'} | "
                     f"{span(d['spearman_same_data_two_seeds'])} | {span(d['spearman_two_plants'])} |")
    checks = summary.get("acceptance", {})
    if checks:
        word = {True: "yes", False: "**no**", None: "not measured in this run"}
        lines += ["", "Issue 18's criteria for the default map (paired 95% t intervals): " +
                  "; ".join(f"{name.replace('_', ' ')}: {word[value]}" for name, value in checks.items()) + "."]
    agree = summary.get("map_agreement")
    if agree and all(agree.values()):
        pct = lambda v: f"{min(v):.0%}–{max(v):.0%}" if v else "—"  # noqa: E731
        lines += ["", f"The default maps themselves: two seeds of the same data put {pct(agree['budget_shared_two_seeds'])} "
                      f"of the budget on the same modules (Spearman of module parameters {span(agree['spearman_two_seeds'])}); "
                      f"two plants {pct(agree['budget_shared_two_plants'])} "
                      f"({span(agree['spearman_two_plants'])})."]
    for field, d in summary["differential_control"].items():
        if "relative_fall" in d:
            f = d["relative_fall"]
            pct = lambda v: f"{min(v):.1%}–{max(v):.1%}" if v else "—"  # noqa: E731
            lines += ["", f"Share of the base's evaluation loss the {field} removed: planted {pct(f['planted'])}, "
                          f"own samples {pct(f['own_samples'])}, teacher {pct(f['teacher'])} (teacher below every "
                          f"planted: {'yes' if d['teacher_fall_below_every_planted'] else 'no'})."]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    main()
