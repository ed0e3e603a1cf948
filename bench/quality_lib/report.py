"""Summaries of the benchmark records: per-arm mean ± std, paired comparisons with 95% intervals, verdicts."""

from __future__ import annotations

from collections import defaultdict

from .arms import ARM_LABELS, ARM_ORDER
from .stats import mean_std, paired, verdict

METRICS = ("test_loss", "forgetting")
# Beyond "every arm vs flat": does the signal beat its own permutation, and the reference rule?
EXTRA_PAIRS = (("map_flat", "control"), ("map_median", "control"), ("map_flat", "reference"),
               ("map_flat_rslora", "map_flat"), ("flat_rslora", "flat"), ("map_grad", "map_flat"),
               ("map_flat_product_lr", "map_flat"))


def summarize(records: list[dict], cells: list[dict], tasks: list[dict]) -> dict:
    """Pooled over every (task, seed) pair; with several tasks also per task (`per_task`)."""
    out = _summarize(records)
    if len({r["task_seed"] for r in records}) > 1:
        out["per_task"] = {str(t["task_seed"]): _summarize([r for r in records if r["task_seed"] == t["task_seed"]])
                           for t in tasks}
    out.update({"tasks": tasks, "cells": [{k: c[k] for k in _CELL_KEYS} for c in cells]})
    return out


_CELL_KEYS = ("task_seed", "seed", "analysis_seconds", "flat_params", "median_map_native_params",
              "flat_map_native_params", "flat_map_rank_max", "cross_run_spearman")


def _summarize(records: list[dict]) -> dict:
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_arm[rec["arm"]].append(rec)
    arms = [a for a in ARM_ORDER if a in by_arm]
    flat_params = by_arm["flat"][0]["params"] if "flat" in by_arm else None
    per_arm = {}
    for arm in arms:
        recs = by_arm[arm]
        per_arm[arm] = {
            "label": ARM_LABELS[arm],
            "params": sorted({r["params"] for r in recs}),
            "params_vs_flat": max(abs(r["params"] / flat_params - 1) for r in recs) if flat_params else None,
            "native_params": sorted({r["native_params"] for r in recs}),
            **{m: mean_std([r[m] for r in recs]) for m in (*METRICS, "adaptation", "train_seconds", "analysis_seconds")},
            "best_lrs": [r["best_lr"] for r in recs],
        }
    comparisons, verdicts = [], []
    pairs = [(a, "flat") for a in arms if a != "flat"] + [p for p in EXTRA_PAIRS if p[0] in by_arm and p[1] in by_arm]
    pairs = list(dict.fromkeys(pairs))
    for a, b in pairs:
        for metric in METRICS:
            diffs = _paired_diffs(by_arm[a], by_arm[b], metric)
            stat = paired(diffs)
            line = verdict(a, b, metric, stat)
            comparisons.append({"arm": a, "vs": b, "metric": metric, **stat, "verdict": line})
            verdicts.append(line)
    return {"arms": per_arm, "comparisons": comparisons, "verdicts": verdicts,
            "param_counts": {a: per_arm[a]["params"] for a in arms},
            "max_param_mismatch_vs_flat": max((v["params_vs_flat"] or 0.0) for v in per_arm.values()) if per_arm else None}


def _paired_diffs(a: list[dict], b: list[dict], metric: str) -> list[float]:
    """a − b for each (task, seed) both arms ran: same data, same seed, same eval draws."""
    other = {(r["task_seed"], r["seed"]): r[metric] for r in b}
    return [r[metric] - other[(r["task_seed"], r["seed"])] for r in a if (r["task_seed"], r["seed"]) in other]


def markdown_table(summary: dict, command: str) -> str:
    """The pooled table, then one per task when several ran."""
    text = f"Command: `{command}`\n\n" + _table(summary, "all tasks pooled" if "per_task" in summary else "")
    for task, sub in summary.get("per_task", {}).items():
        text += "\n" + _table(sub, f"task-seed {task}")
    return text


def _table(summary: dict, title: str) -> str:
    comp = {(c["arm"], c["vs"], c["metric"]): c for c in summary["comparisons"]}
    lines = ([f"#### {title}", ""] if title else []) + [
             "| arm | params | test loss (mean ± std) | Δ test vs flat [95% CI] | forgetting (mean ± std) "
             "| Δ forgetting vs flat [95% CI] | train s | best LRs |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, s in summary["arms"].items():
        params = "/".join(str(p) for p in s["params"])
        cells = [s["label"], params, _ms(s["test_loss"]), _diff(comp.get((arm, "flat", "test_loss"))),
                 _ms(s["forgetting"]), _diff(comp.get((arm, "flat", "forgetting"))),
                 f"{s['train_seconds']['mean']:.1f}", ", ".join(f"{x:g}" for x in s["best_lrs"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Verdicts:", ""] + [f"- {v}" for v in summary["verdicts"]]
    return "\n".join(lines) + "\n"


def _ms(stat: dict) -> str:
    return f"{stat['mean']:.5f} ± {stat['std']:.5f}"


def _diff(c: dict | None) -> str:
    if c is None:
        return "—"
    if c["ci95_t"] is None:
        return f"{c['mean']:+.5f} (n=1)"
    lo, hi = c["ci95_t"]
    return f"{c['mean']:+.5f} [{lo:+.5f}, {hi:+.5f}]"
