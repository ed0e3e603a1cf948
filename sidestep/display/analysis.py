"""The Preprocessing++ preview, shared by `sidestep analyze` and the wizard."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from sidestep.analysis.report import BY_FISHER, concentration_sentence, rank_max_sentence
from sidestep.display import output

__all__ = ["print_preview"]


def print_preview(preview) -> None:
    """The rich preview: per-category counts, rank histogram, top modules, low-confidence list, parameter cost."""
    console = output.console
    table = Table(title="Modules per category", title_justify="left")
    for column in ("category", "included", "excluded"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for c in preview.categories:
        table.add_row(c.category, str(c.included), str(c.excluded))
    console.print(table)
    histogram = Table(title="Rank histogram", title_justify="left")
    histogram.add_column("rank", justify="right")
    histogram.add_column("modules", justify="right")
    histogram.add_column("")
    most = max((n for _, n in preview.rank_histogram), default=1)
    for rank, count in preview.rank_histogram:
        histogram.add_row(str(rank), str(count), "█" * max(1, round(24 * count / most)))
    console.print(histogram)
    console.print(_top_table(preview))
    console.print(f"Adapted {preview.adapted} of {preview.targetable} modules; median rank {preview.median_rank:g}; "
                  f"trainable parameters {preview.trainable_params:,} vs {preview.flat_equivalent_params:,} for a flat "
                  f"LoRA on every module ({_ratio(preview)}).")
    runs = "; ".join(f"run {r}: {b} batches, ρ {_opt(s, '.3f')}{' (converged)' if c else ''}" for r, b, s, c in preview.runs)
    agreement = f"agreement between runs ρ {_opt(preview.cross_run_spearman, '.3f')}"
    unsettled = [r for r, _b, _s, converged in preview.runs if not converged]
    if preview.probe_set_ranks:
        # The Fisher runs fill the map's Fisher scores, need and gradient-init file; the ranks do not depend on them.
        console.print(f"Fisher runs (the probe set the ranks; these fill the map's Fisher scores, need and --init "
                      f"gradient file): {runs}; {agreement}.")
    else:
        console.print(f"Convergence: {runs}; {agreement}.")
    if unsettled and not preview.probe_set_ranks:
        which = ", ".join(map(str, unsettled))
        output.warn(f"Run{'s' if len(unsettled) > 1 else ''} {which} of {len(preview.runs)} did not converge: the "
                    "module ranking was still changing when the batches ran out, so this map is less certain. More "
                    "batches per run (--batches-per-run) or more songs steady it.")
    if preview.concentration is not None:
        console.print(concentration_sentence(preview.concentration))
    capped = rank_max_sentence(preview)
    if capped:
        output.warn(capped)
    if preview.low_confidence and not preview.probe_set_ranks:  # a Fisher score's spread; it set no rank here
        shown = ", ".join(preview.low_confidence[:8]) + (" …" if len(preview.low_confidence) > 8 else "")
        output.warn(f"{len(preview.low_confidence)} low-confidence module(s) (cross-run std > 50% of the score): {shown}")


def _top_table(preview) -> Table:
    """The top modules by what set the ranks: their share of the probe's loss fall or of the need, or Fisher score."""
    if preview.ranked_by != BY_FISHER:
        table = Table(title=f"Top {len(preview.top)} modules by their share of {preview.ranked_by}", title_justify="left")
        for column in ("module", "share", "rank"):
            table.add_column(column, justify="left" if column == "module" else "right")
        for m in preview.top:
            table.add_row(m.name, f"{m.share:.1%}", _opt(m.rank))
        return table
    table = Table(title=f"Top {len(preview.top)} modules by Fisher score", title_justify="left")
    for column in ("module", "Fisher score", "data rank", "weight rank", "rank"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for m in preview.top:
        table.add_row(m.name, _opt(m.fisher, ".3e"), _opt(m.data_rank), _opt(m.weight_rank), _opt(m.rank))
    return table


def _opt(value: Any, fmt: str = "") -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(preview) -> str:
    if not preview.flat_equivalent_params:
        return "no flat budget"
    return f"{preview.trainable_params / preview.flat_equivalent_params:.0%} of it"
