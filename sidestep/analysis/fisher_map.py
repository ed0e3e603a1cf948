"""fisher_map.json: the map Preprocessing++ writes and training reads (schema: docs/fisher-map.md).

Inside sidestep every module name is the ORIGINAL ACE-Step name without `decoder.`; on disk only
`modules[].name` carries the prefix, as the reference (Side-Step, version 2) writes it. Readers accept
versions 1 to 3 and keep unknown fields in `FisherMap.extra`; the writer always writes version 3.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from sidestep import __version__
from sidestep.analysis.modules import DECODER_PREFIX, PROJECTIONS, category_of, module_sort_key, strip_decoder_prefix, suffix_of
from sidestep.errors import MapError
from sidestep.fileio import backup_existing, write_json_atomic

__all__ = [
    "ADVISED_LR", "LR_ADVICE", "MAP_FILENAME", "MAP_VERSION", "Convergence", "FisherMap", "InitRef", "ModuleEntry", "RunConvergence",
    "SampleCoverage", "TimestepParams", "ToolInfo", "from_json_dict", "read_map", "to_json_dict", "write_map",
    "NEED_FIELD", "NeedSummary", "need_summary",
]  # fmt: skip

MAP_FILENAME = "fisher_map.json"
MAP_VERSION = 3
# The learning rate advised for training with a map (it adapts strongly, and turbo models are fragile with one).
ADVISED_LR = "5e-5"
LR_ADVICE = ("Preprocessing++ adapts strongly and can overfit sooner: train with a lower learning rate "
             f"(e.g. --lr {ADVISED_LR} instead of 1e-4) and check samples early.")
_FIX = "delete it or pass --ignore-fisher-map"
_MAX_DEPTH = 16  # the map's own structure nests 4 deep; unknown extra fields get some room
_MAX_RANK = 1 << 16  # wider than any ACE-Step module; checked against the real module shapes at training time


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    """One adapted module; `name` is the original name (no `decoder.`), `category` is filled from it."""

    name: str
    fisher_score: float
    fisher_cross_run_std: float
    effective_rank: int | None  # weight effective rank (reference's spectral factor); None when not measured
    assigned_rank: int
    data_rank: int | None = None
    category: str = ""

    def __post_init__(self) -> None:
        if not self.category:
            object.__setattr__(self, "category", category_of(self.name).value)


@dataclass(frozen=True, slots=True)
class TimestepParams:
    """The logit-normal timestep distribution used by the balanced focus."""

    mu: float
    sigma: float
    data_proportion: float


@dataclass(frozen=True, slots=True)
class SampleCoverage:
    """Which samples one estimation run saw."""

    run: int
    selected_count: int
    total_count: int
    coverage_ratio: float
    selected_files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunConvergence:
    """How one run's ranking settled: batches used and the last Spearman correlation checked."""

    run: int
    batches: int
    final_spearman: float | None = None
    converged: bool = False


@dataclass(frozen=True, slots=True)
class Convergence:
    """Per-run convergence and the mean pairwise Spearman between the runs' estimates."""

    runs: tuple[RunConvergence, ...] = ()
    cross_run_spearman: float | None = None


@dataclass(frozen=True, slots=True)
class ToolInfo:
    """The program that wrote the map."""

    name: str = "sidestep"
    version: str = __version__


@dataclass(frozen=True, slots=True)
class InitRef:
    """The gradient-init file stored next to the map (relative path), its hash, sketch width and seed."""

    file: str
    sha256: str
    k: int
    seed: int


@dataclass(frozen=True)
class FisherMap:
    """Everything fisher_map.json holds; field meanings are in docs/fisher-map.md.

    `rank_budget {min, max}` on disk is `rank_min`/`rank_max` here; `target_modules` is derived from
    `rank_pattern`. Fields a map may lack (reference or older maps) are None, 0 or empty.
    """

    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, int | float]
    modules: tuple[ModuleEntry, ...] = ()
    excluded_modules: tuple[str, ...] = ()
    version: int = MAP_VERSION
    model_variant: str = ""
    timestep_focus: str = "balanced"
    timestep_range: tuple[float, float] = (0.0, 1.0)
    timestep_params: TimestepParams | None = None
    num_runs: int = 0
    batches_per_run: int = 0
    total_batches: int = 0
    base_rank: int | None = None
    rank_min: int | None = None
    rank_max: int | None = None
    dataset_hash: str = ""
    sample_coverage: tuple[SampleCoverage, ...] = ()
    num_hidden_layers: int | None = None
    created_at: str = ""
    tool: ToolInfo | None = None
    seed: int | None = None
    rank_signal: str | None = None
    budget_mode: str | None = None
    rank_step: int | None = None
    alpha_ratio: float | None = None
    trainable_params: int | None = None
    flat_equivalent_params: int | None = None
    convergence: Convergence | None = None
    low_confidence_modules: tuple[str, ...] = ()
    content_hash: str | None = None
    report: str | None = None
    init: InitRef | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        """The unique per-layer suffixes of the adapted modules, in PROJECTIONS order (peft `target_modules`)."""
        present = {suffix_of(name) for name in self.rank_pattern}
        return [suffix for suffix in PROJECTIONS if suffix in present]

    @property
    def adapted_modules(self) -> list[str]:
        """Full original names of the adapted modules, layer-major.

        peft matches a suffix in `target_modules` in every layer, so pass these (or add
        `exclude_modules=excluded_modules`) when excluded modules must stay without an adapter.
        """
        return sorted(self.rank_pattern, key=module_sort_key)

    def rank_of(self, name: str) -> int | None:
        """The map's rank for an original module name (a leading `decoder.` is ignored); None if not adapted."""
        return self.rank_pattern.get(strip_decoder_prefix(name))

    def alpha_of(self, name: str) -> int | float | None:
        """The map's alpha for an original module name; None if not adapted."""
        return self.alpha_pattern.get(strip_decoder_prefix(name))


# ---- writing ---------------------------------------------------------------------------------------


def to_json_dict(fmap: FisherMap) -> dict[str, Any]:
    """The on-disk form: reference fields first in the spec's order, ours after, unknown ones last; None omitted."""
    modules = sorted(fmap.modules, key=lambda m: (-m.fisher_score, module_sort_key(m.name)))
    payload: dict[str, Any] = {
        "version": MAP_VERSION,
        "model_variant": fmap.model_variant,
        "timestep_focus": fmap.timestep_focus,
        "timestep_range": [float(x) for x in fmap.timestep_range],
        "timestep_params": _plain(fmap.timestep_params),
        "num_runs": fmap.num_runs,
        "batches_per_run": fmap.batches_per_run,
        "total_batches": fmap.total_batches,
        "base_rank": fmap.base_rank,
        "rank_budget": None if fmap.rank_min is None else {"min": fmap.rank_min, "max": fmap.rank_max},
        "dataset_hash": fmap.dataset_hash,
        "target_modules": fmap.target_modules,
        "rank_pattern": {name: fmap.rank_pattern[name] for name in fmap.adapted_modules},
        "alpha_pattern": {name: fmap.alpha_pattern[name] for name in fmap.adapted_modules},
        "modules": [_module_json(m) for m in modules],
        "excluded_modules": sorted(fmap.excluded_modules, key=module_sort_key),
        "sample_coverage": [_plain(c) for c in fmap.sample_coverage],
        "num_hidden_layers": fmap.num_hidden_layers,
        "created_at": fmap.created_at,
        "tool": _plain(fmap.tool),
        "seed": fmap.seed,
        "rank_signal": fmap.rank_signal,
        "budget_mode": fmap.budget_mode,
        "rank_step": fmap.rank_step,
        "alpha_ratio": fmap.alpha_ratio,
        "trainable_params": fmap.trainable_params,
        "flat_equivalent_params": fmap.flat_equivalent_params,
        "convergence": _plain(fmap.convergence),
        "low_confidence_modules": sorted(fmap.low_confidence_modules, key=module_sort_key),
        "content_hash": fmap.content_hash,
        "report": fmap.report,
        "init": _plain(fmap.init),
    }
    payload = {key: value for key, value in payload.items() if value is not None}
    payload.update({key: fmap.extra[key] for key in sorted(fmap.extra) if key not in _KNOWN})
    return payload


def write_map(fmap: FisherMap, path: Path) -> Path | None:
    """Write the map atomically (a folder means `<folder>/fisher_map.json`); an old file is kept as `.bak`.

    `created_at` is stamped now when empty; it is the only field that differs between two writes of one map.
    Returns the `.bak` path, or None when there was nothing to back up.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MAP_FILENAME
    if not fmap.created_at:
        fmap = replace(fmap, created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    payload = to_json_dict(fmap)
    backup = backup_existing(path)
    write_json_atomic(path, payload)
    return backup


def _finite_positive(value: int | float) -> bool:
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float
        return False


def _module_json(entry: ModuleEntry) -> dict[str, Any]:
    out = {
        "name": DECODER_PREFIX + entry.name,  # the reference's form
        "fisher_score": entry.fisher_score,
        "fisher_cross_run_std": entry.fisher_cross_run_std,
        "effective_rank": entry.effective_rank,
        "assigned_rank": entry.assigned_rank,
        "category": entry.category,
    }
    if entry.data_rank is not None:
        out["data_rank"] = entry.data_rank
    return out


def _plain(obj: Any) -> Any:
    """A small frozen dataclass (possibly nested, with tuples) as JSON-ready dicts and lists."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (tuple, list)):
        return [_plain(x) for x in obj]
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}


# ---- reading ---------------------------------------------------------------------------------------


def read_map(path: Path) -> FisherMap:
    """Read and validate a map (a folder means `<folder>/fisher_map.json`); any problem is one MapError."""
    path = Path(path)
    if path.is_dir():
        path = path / MAP_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MapError(f"{path}: no such file; run `sidestep analyze` first or pass --ignore-fisher-map.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MapError(f"{path}: cannot be read ({err}); {_FIX}.") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MapError(f"{path}: is not valid JSON ({err.msg} at line {err.lineno}); {_FIX}.") from None
    except RecursionError:
        raise MapError(f"{path}: is nested too deeply to be a map; {_FIX}.") from None
    except ValueError:  # an integer with thousands of digits
        raise MapError(f"{path}: holds a number too long to read; {_FIX}.") from None
    if _depth(data) > _MAX_DEPTH:
        raise MapError(f"{path}: is nested more than {_MAX_DEPTH} levels deep, which no map is; {_FIX}.")
    return from_json_dict(data, path)


def _depth(data: Any) -> int:
    """How deeply lists and objects nest (iterative: a hostile file must not exhaust the stack)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if level <= _MAX_DEPTH:
                stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def from_json_dict(data: Any, source: Path) -> FisherMap:
    """Validate a parsed map of version 1 to 3; fields it lacks get their defaults, unknown ones go to `extra`."""
    r = _Reader(source)
    if not isinstance(data, dict):
        raise r.fail(f"holds a JSON {type(data).__name__}, not an object")
    version = r.typed(data, "version", int, 1)
    if not 1 <= version <= MAP_VERSION:
        raise r.fail(f"has version {version}, but this sidestep reads versions 1 to {MAP_VERSION}")
    for key in ("target_modules", "rank_pattern", "alpha_pattern"):
        if key not in data:
            raise r.fail(f"lacks the required field '{key}'")
    r.names(data, "target_modules", keep_suffix=True)
    ranks, alphas = r.patterns(data)
    budget = r.typed(data, "rank_budget", dict, {})
    return FisherMap(
        **{key: r.typed(data, key, kind, _DEFAULTS[key]) for key, kind in _SCALARS.items()},
        rank_pattern=ranks,
        alpha_pattern=alphas,
        modules=tuple(r.module(entry, ranks) for entry in r.typed(data, "modules", list, [])),
        excluded_modules=tuple(r.names(data, "excluded_modules")),
        version=version,
        timestep_range=r.timestep_range(data),
        timestep_params=r.nested(data, "timestep_params", TimestepParams),
        rank_min=r.typed(budget, "min", int, None, where="rank_budget.min"),
        rank_max=r.typed(budget, "max", int, None, where="rank_budget.max"),
        sample_coverage=tuple(
            r.nested({"_": c}, "_", SampleCoverage, where="sample_coverage[]")
            for c in r.typed(data, "sample_coverage", list, [])
        ),
        tool=r.nested(data, "tool", ToolInfo),
        convergence=r.convergence(data),
        low_confidence_modules=tuple(r.names(data, "low_confidence_modules")),
        init=r.init_ref(data),
        extra={key: value for key, value in data.items() if key not in _KNOWN},
    )


# Top-level fields that are one JSON scalar each, with their type; absent or null gives the dataclass default.
_SCALARS: dict[str, type] = {
    **dict.fromkeys(("model_variant", "timestep_focus", "dataset_hash", "created_at"), str),
    **dict.fromkeys(("rank_signal", "budget_mode", "content_hash", "report"), str),
    **dict.fromkeys(("num_runs", "batches_per_run", "total_batches", "base_rank", "num_hidden_layers"), int),
    **dict.fromkeys(("seed", "rank_step", "trainable_params", "flat_equivalent_params"), int),
    "alpha_ratio": float,
}
_DEFAULTS = {f.name: f.default for f in fields(FisherMap)}
_KNOWN = frozenset(
    {f.name for f in fields(FisherMap)} - {"rank_min", "rank_max", "extra"} | {"rank_budget", "target_modules"}
)
# The JSON type of each field of the nested records (frozen dataclasses above).
_NESTED_KINDS: dict[tuple[type, str], type] = {
    **{(TimestepParams, k): float for k in ("mu", "sigma", "data_proportion")},
    **{(SampleCoverage, k): int for k in ("run", "selected_count", "total_count")},
    (SampleCoverage, "coverage_ratio"): float,
    (SampleCoverage, "selected_files"): list,
    (RunConvergence, "run"): int,
    (RunConvergence, "batches"): int,
    (RunConvergence, "final_spearman"): float,
    (RunConvergence, "converged"): bool,
    (ToolInfo, "name"): str,
    (ToolInfo, "version"): str,
    **{(InitRef, k): str for k in ("file", "sha256")},
    **{(InitRef, k): int for k in ("k", "seed")},
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "true or false"}


class _Reader:
    """Typed access to a parsed map; every failure is one MapError naming the file and the field."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, what: str) -> MapError:
        return MapError(f"{self.source}: {what}; {_FIX}.")

    def typed(self, obj: Mapping[str, Any], key: str, kind: type, default: Any, where: str | None = None) -> Any:
        """obj[key] checked against kind (ints count as numbers, bools as nothing else); None/absent → default."""
        value = obj.get(key)
        if value is None:
            return default
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise self.fail(f"'{where or key}' must be {_TYPE_NAMES[kind]}, not {json.dumps(value)[:40]}")
        return value

    def name(self, value: Any, where: str, keep_suffix: bool = False) -> str:
        """A module name without `decoder.`; a suffix like `mlp.up_proj` when keep_suffix."""
        if not isinstance(value, str):
            raise self.fail(f"'{where}' holds {json.dumps(value)[:40]}, not a module name")
        name = strip_decoder_prefix(value)
        try:
            module_sort_key(f"layers.0.{name}" if keep_suffix else name)
        except ValueError:
            raise self.fail(f"'{where}' holds {value!r}, which is not an ACE-Step target module") from None
        return name

    def names(self, obj: Mapping[str, Any], key: str, keep_suffix: bool = False) -> list[str]:
        return [self.name(v, key, keep_suffix) for v in self.typed(obj, key, list, [])]

    def patterns(self, data: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int | float]]:
        """rank_pattern (positive ints) and alpha_pattern (positive numbers) over the same modules."""
        ranks = {self.name(k, "rank_pattern"): v for k, v in self.typed(data, "rank_pattern", dict, {}).items()}
        alphas = {self.name(k, "alpha_pattern"): v for k, v in self.typed(data, "alpha_pattern", dict, {}).items()}
        for name, rank in ranks.items():
            if not (isinstance(rank, int) and not isinstance(rank, bool) and 0 < rank <= _MAX_RANK):
                raise self.fail(f"rank_pattern gives {name} the rank {json.dumps(rank)[:40]}, not a positive integer "
                                f"up to {_MAX_RANK}")
        for name, alpha in alphas.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not _finite_positive(alpha):
                raise self.fail(f"alpha_pattern gives {name} the alpha {json.dumps(alpha)[:40]}, not a positive number")
        if set(ranks) != set(alphas):
            odd = sorted(set(ranks) ^ set(alphas), key=module_sort_key)[0]
            raise self.fail(f"rank_pattern and alpha_pattern list different modules (e.g. {odd})")
        return ranks, {k: int(a) if isinstance(a, float) and a.is_integer() else a for k, a in alphas.items()}

    def module(self, entry: Any, ranks: Mapping[str, int]) -> ModuleEntry:
        if not isinstance(entry, dict):
            raise self.fail("each entry of 'modules' must be an object")
        name = self.name(entry.get("name"), "modules[].name")
        rank = self.typed(entry, "assigned_rank", int, ranks.get(name), where=f"modules[{name}].assigned_rank")
        if rank is None or rank <= 0:
            raise self.fail(f"modules[{name}] has no positive assigned_rank")
        return ModuleEntry(
            name=name,
            fisher_score=self.typed(entry, "fisher_score", float, 0.0, where=f"modules[{name}].fisher_score"),
            fisher_cross_run_std=self.typed(entry, "fisher_cross_run_std", float, 0.0, where=f"modules[{name}].fisher_cross_run_std"),
            effective_rank=self.typed(entry, "effective_rank", int, None, where=f"modules[{name}].effective_rank"),
            assigned_rank=rank,
            data_rank=self.typed(entry, "data_rank", int, None, where=f"modules[{name}].data_rank"),
        )

    def init_ref(self, data: Mapping[str, Any]) -> InitRef | None:
        """`init`: its file must be a plain name beside the map, never a path out of the dataset folder."""
        ref = self.nested(data, "init", InitRef)
        if ref is not None and (not ref.file or ref.file in (".", "..") or "/" in ref.file or "\\" in ref.file
                                or ":" in ref.file or "\0" in ref.file):
            raise self.fail(f"'init.file' is {ref.file[:60]!r}, but it must name a file beside the map")
        return ref

    def timestep_range(self, data: Mapping[str, Any]) -> tuple[float, float]:
        pair = self.typed(data, "timestep_range", list, [0.0, 1.0])
        if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in pair):
            raise self.fail(f"'timestep_range' must be two numbers, not {json.dumps(pair)[:40]}")
        return float(pair[0]), float(pair[1])

    def nested(self, obj: Mapping[str, Any], key: str, cls: type, where: str | None = None) -> Any:
        """A flat dataclass from obj[key] (None/absent → None); its fields without a default are required."""
        where = where or key
        value = self.typed(obj, key, dict, None, where=where)
        if value is None:
            return None
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            got = self.typed(value, f.name, _NESTED_KINDS[cls, f.name], None, where=f"{where}.{f.name}")
            if got is None and f.default is MISSING and f.default_factory is MISSING:
                raise self.fail(f"'{where}' lacks '{f.name}'")
            if isinstance(got, list):
                got = tuple(self.typed({"_": x}, "_", str, "", where=f"{where}.{f.name}[]") for x in got)
            if got is not None:
                kwargs[f.name] = got
        return cls(**kwargs)

    def convergence(self, data: Mapping[str, Any]) -> Convergence | None:
        value = self.typed(data, "convergence", dict, None)
        if value is None:
            return None
        runs = tuple(self.nested({"_": run}, "_", RunConvergence, where="convergence.runs[]")
                     for run in self.typed(value, "runs", list, [], where="convergence.runs"))
        return Convergence(runs, self.typed(value, "cross_run_spearman", float, None, where="convergence.cross_run_spearman"))


# ---- the optional `need` field (version 3, additive) -------------------------------------------------

NEED_FIELD = "need"


@dataclass(frozen=True, slots=True)
class NeedSummary:
    """How concentrated the dataset's need is (the map's optional `need` field; docs/fisher-map.md).

    Args:
        top10_share: share of the total need per parameter held by the top 10% of modules (0.10 = even).
        spread_evenly: True when that share is low enough that a flat LoRA should do as well.
        per_module: original module name -> unbiased need per rank-1 LoRA parameter.
    """

    top10_share: float
    spread_evenly: bool
    per_module: dict[str, float]


def need_summary(fmap: FisherMap) -> NeedSummary | None:
    """The map's `need` field, or None when it has none (older maps, or an analysis without sketches).

    It travels in `FisherMap.extra`, so maps without it read exactly as before; a malformed one counts as absent.
    """
    raw = fmap.extra.get(NEED_FIELD)
    try:
        share = float(raw["top10_share"])
        modules = {str(k): float(v["need_per_param"]) for k, v in raw["per_module"].items()}
        return NeedSummary(share, bool(raw["spread_evenly"]), modules)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
