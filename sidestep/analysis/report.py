"""The picture and the preview of a map: a layers × modules heatmap (PNG) and the pieces of the terminal preview.

Rendering the preview with rich lives in the CLI; this module only computes what it shows.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass

from sidestep.analysis.config import FLAT_HEADROOM, RankSignal
from sidestep.analysis.engine import AnalysisResult
from sidestep.analysis.fisher_map import (Concentration, FisherMap, SignalShares, concentration_summary,
                                          modules_at_rank_max, signal_shares)
from sidestep.analysis.modules import PROJECTIONS, Category, category_of, layer_of, suffix_of

__all__ = ["BY_FISHER", "CategoryCount", "Preview", "TopModule", "build_preview", "rank_max_sentence", "render_png"]

BY_FISHER = "Fisher score"  # Preview.ranked_by when no probe or need share set the ranks

TOP_N = 5
# Under --budget flat, this share of the adapted modules at --rank-max means the cap, not the signal, shaped the map.
CAPPED_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class CategoryCount:
    category: str
    included: int
    excluded: int


@dataclass(frozen=True, slots=True)
class TopModule:
    name: str
    fisher: float | None  # None in the top modules of a probe or need map (ranked by their share of it)
    data_rank: int | None
    weight_rank: int | None
    rank: int | None  # None: not adapted
    share: float | None = None  # its share of the probe's loss fall or of the need, when that set the ranks


@dataclass(frozen=True)
class Preview:
    """Everything the terminal preview shows before the save question."""

    categories: tuple[CategoryCount, ...]
    rank_histogram: tuple[tuple[int, int], ...]  # (rank, modules), ascending rank
    top: tuple[TopModule, ...]
    low_confidence: tuple[str, ...]
    adapted: int
    targetable: int
    median_rank: float | None
    trainable_params: int
    flat_equivalent_params: int
    cross_run_spearman: float | None
    runs: tuple[tuple[int, int, float | None, bool], ...]  # (run, batches, final spearman, converged)
    concentration: Concentration | None = None  # how concentrated the demand is; None for maps without it
    at_rank_max: int = 0  # adapted modules at --rank-max
    rank_max: int | None = None
    base_rank: int | None = None
    flat_budget: bool = False
    ranked_by: str = BY_FISHER  # what the top modules are ranked by: BY_FISHER or a SignalShares.measure
    probe_set_ranks: bool = False  # the ranks come from the probe; the Fisher runs only fill the map's other fields


def concentration_sentence(c: Concentration) -> str:
    """The plain sentence the preview prints about how concentrated the demand is."""
    # Per parameter, as the ranks are bought: one module's raw share can be large only because the module is wide.
    share = f"the top 10% of modules hold {c.top10_share:.0%} of it"
    if c.spread_evenly:
        where = (f"Per parameter, the {c.measure} is spread evenly over the modules ({share}): a flat LoRA will "
                 "likely do as well on this dataset.")
    else:
        where = f"Per parameter, the {c.measure} is concentrated: {share}."
    if c.loss_fall is None:
        return where
    return f"The probe lowered the model's loss on this data by {c.loss_fall:.1%}. {where}"


def rank_max_sentence(preview: Preview) -> str | None:
    """A warning when --rank-max, not the signal, shaped a flat-budget map; None otherwise.

    Under --budget flat the budget has to go somewhere: when the modules that ask for most are all at the cap,
    it spreads over modules that ask for less. On the planted benchmark a cap of twice --rank lost about half of
    the map's gain, and four times --rank none (docs/data-awareness.md).
    """
    if not preview.flat_budget or not preview.rank_max or preview.at_rank_max < max(1, CAPPED_SHARE * preview.adapted):
        return None
    wider = FLAT_HEADROOM * (preview.base_rank or 0)
    hint = f"; --rank-max {wider} or more lets it" if wider > preview.rank_max else ""
    return (f"{preview.at_rank_max} of the {preview.adapted} adapted modules are at --rank-max {preview.rank_max}: "
            f"the flat budget would go further to the modules that ask for most, so it spreads over more modules "
            f"instead{hint}.")


def build_preview(fmap: FisherMap) -> Preview:
    """The preview of `fmap`. Its top modules are ranked by what set the ranks: their shares of the probe's loss fall
    (a probe map) or of the need (a need map), else the module entries' Fisher scores."""
    adapted = fmap.rank_pattern
    categories = tuple(
        CategoryCount(c.value, sum(category_of(n) is c for n in adapted),
                      sum(category_of(n) is c for n in fmap.excluded_modules))
        for c in Category
    )
    shares = signal_shares(fmap)
    ranks = sorted(adapted.values())
    median = None
    if ranks:
        mid = len(ranks) // 2
        median = float(ranks[mid]) if len(ranks) % 2 else (ranks[mid - 1] + ranks[mid]) / 2
    convergence = fmap.convergence
    return Preview(
        categories=categories,
        rank_histogram=tuple(sorted(Counter(ranks).items())),
        top=_top_by_share(fmap, shares) if shares else _top_by_fisher(fmap),
        low_confidence=tuple(fmap.low_confidence_modules),
        adapted=len(adapted),
        targetable=len(adapted) + len(fmap.excluded_modules),
        median_rank=median,
        trainable_params=fmap.trainable_params or 0,
        flat_equivalent_params=fmap.flat_equivalent_params or 0,
        cross_run_spearman=convergence.cross_run_spearman if convergence else None,
        runs=tuple((r.run, r.batches, r.final_spearman, r.converged) for r in convergence.runs) if convergence else (),
        concentration=concentration_summary(fmap),
        at_rank_max=modules_at_rank_max(fmap),
        rank_max=fmap.rank_max,
        base_rank=fmap.base_rank,
        flat_budget=fmap.budget_mode == "flat",
        ranked_by=shares.measure if shares else BY_FISHER,
        probe_set_ranks=shares is not None and fmap.rank_signal == RankSignal.PROBE.value,
    )


def _top_by_fisher(fmap: FisherMap) -> tuple[TopModule, ...]:
    entries = sorted(fmap.modules, key=lambda m: (-m.fisher_score, m.name))[:TOP_N]
    return tuple(TopModule(m.name, m.fisher_score, m.data_rank, m.effective_rank, m.assigned_rank) for m in entries)


def _top_by_share(fmap: FisherMap, shares: SignalShares) -> tuple[TopModule, ...]:
    """The modules holding most of what set the ranks (the probe's loss fall, or the need)."""
    of = shares.of_module
    return tuple(TopModule(n, None, None, None, fmap.rank_pattern.get(n), of[n])
                 for n in sorted(of, key=lambda n: (-of[n], n))[:TOP_N])


def render_png(fmap: FisherMap, result: AnalysisResult) -> bytes:
    """Two heatmaps (layers × the 11 projections): what set the ranks, for every module (its share of the probe's
    loss fall or of the need, else log10 Fisher score), and the assigned rank (excluded modules blank). Returns PNG bytes; the
    caller writes them atomically."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, Agg for PNG

    layers = 1 + max(layer_of(m.name) for m in result.modules)
    column = {suffix: i for i, suffix in enumerate(PROJECTIONS)}
    scores = np.full((layers, len(PROJECTIONS)), np.nan)
    ranks = np.full((layers, len(PROJECTIONS)), np.nan)
    shares = signal_shares(fmap)
    for m in result.modules:
        cell = layer_of(m.name), column[suffix_of(m.name)]
        if shares is not None:
            scores[cell] = 100 * max(shares.of_module.get(m.name, 0.0), 0.0)  # a share <= 0 bought nothing
        else:
            scores[cell] = math.log10(m.fisher) if m.fisher > 0 else np.nan
        if m.name in fmap.rank_pattern:
            ranks[cell] = fmap.rank_pattern[m.name]
    labels = [s.replace("self_attn.", "sa.").replace("cross_attn.", "ca.") for s in PROJECTIONS]
    height = max(3.0, 0.28 * layers + 1.8)
    fig = Figure(figsize=(12, height), layout="constrained")
    axes = fig.subplots(1, 2)
    signal = f"% of {shares.measure}" if shares is not None else "log10 Fisher score"
    panels = ((axes[0], scores, "viridis", signal), (axes[1], ranks, "plasma", "assigned rank (blank: excluded)"))
    for ax, data, cmap, title in panels:
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, shrink=0.8)
    if layers <= 32:  # small enough to print each rank in its cell
        middle = (np.nanmin(ranks) + np.nanmax(ranks)) / 2 if np.isfinite(ranks).any() else 0
        for (row, col), value in np.ndenumerate(ranks):
            if not np.isnan(value):
                axes[1].text(col, row, str(int(value)), ha="center", va="center", fontsize=6,
                             color="black" if value > middle else "white")
    fig.suptitle(f"Preprocessing++ map: {len(fmap.rank_pattern)} of {len(result.modules)} modules adapted, "
                 f"focus {fmap.timestep_focus}, {fmap.budget_mode or 'median'} budget at rank {fmap.base_rank}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
