"""fisher_map.json: the map Preprocessing++ writes and training reads (schema: docs/fisher-map.md).

Inside sidestep every module name is the ORIGINAL ACE-Step name without `decoder.`; on disk only
`modules[].name` carries the prefix, as the reference (Side-Step, version 2) writes it. Readers accept
versions 1 to 3 and keep unknown fields in `FisherMap.extra`; the writer always writes version 3.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from datetime import datetime, timezone
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Callable, Union, get_args, get_origin, get_type_hints

from sidestep import __version__
from sidestep.analysis.modules import DECODER_PREFIX, PROJECTIONS, category_of, module_sort_key, strip_decoder_prefix, suffix_of
from sidestep.errors import MapError
from sidestep.fileio import backup_existing, write_json_atomic

__all__ = [
    "ADVISED_LR", "LR_ADVICE", "MAP_FILENAME", "MAP_VERSION", "Convergence", "FisherMap", "InitRef", "ModuleEntry", "RunConvergence",
    "SampleCoverage", "TimestepParams", "ToolInfo", "from_json_dict", "read_map", "to_json_dict", "write_map",
    "NEED_FIELD", "PROBE_FIELD", "TURBO_MAP_ADVICE", "Concentration", "concentration_summary", "concentrations", "modules_at_rank_max",
    "SignalShares", "signal_shares",
]  # fmt: skip

MAP_FILENAME = "fisher_map.json"
MAP_VERSION = 3
# The learning rate advised for training with a map (it adapts strongly, and turbo models are fragile with one).
ADVISED_LR = "5e-5"
LR_ADVICE = ("Preprocessing++ adapts strongly and can overfit sooner: train with a lower learning rate "
             f"(e.g. --lr {ADVISED_LR} instead of 1e-4) and check samples early.")
# Said wherever a turbo model meets a map (analyze, train, the wizard): one sentence, one place.
TURBO_MAP_ADVICE = (f"Turbo models are fragile with Preprocessing++ maps: use a lower learning rate (--lr "
                    f"{ADVISED_LR}) and listen to early checkpoints; if the loss spikes, delete fisher_map.json or pass "
                    "--ignore-fisher-map, or train on base.")
_FIX = "delete it or pass --ignore-fisher-map"
_MAX_DEPTH = 16  # the map's own structure nests 4 deep; unknown extra fields get some room
_MAX_RANK = 1 << 16  # wider than any ACE-Step module; checked against the real module shapes at training time


@dataclass(frozen=True)
class _Check:
    """What a JSON value must be beyond its type, as `Annotated` metadata: `convert` gives the value to keep or None."""

    describe: str
    convert: Callable[[Any], Any]


def _module_name(value: str, keep_suffix: bool = False) -> str | None:
    name = strip_decoder_prefix(value)
    try:
        module_sort_key(f"layers.0.{name}" if keep_suffix else name)
    except ValueError:
        return None
    return name


def _positive_alpha(value: int | float) -> int | float | None:
    try:
        ok = math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float
        ok = False
    return (int(value) if isinstance(value, float) and value.is_integer() else value) if ok else None


def _beside_map(file: str) -> str | None:
    """The init file must be a plain name beside the map, never a path out of the dataset folder."""
    bad = not file or file in (".", "..") or any(c in file for c in "/\\:\0")
    return None if bad else file


# The types of the map's fields carry their JSON rules: the reader below is derived from them.
ModuleName = Annotated[str, _Check("an ACE-Step target module", _module_name)]  # on disk possibly `decoder.`-prefixed
ModuleSuffix = Annotated[str, _Check("an ACE-Step target module", lambda v: _module_name(v, keep_suffix=True))]
Rank = Annotated[int, _Check(f"a positive integer up to {_MAX_RANK}", lambda v: v if 0 < v <= _MAX_RANK else None)]
Alpha = Annotated[Union[int, float], _Check("a positive number", _positive_alpha)]
FileName = Annotated[str, _Check("a file name beside the map", _beside_map)]


def _absent(value: Any) -> dict[str, Any]:
    """Field metadata: the value a map that lacks this field (an older one) reads as."""
    return {"absent": value}


_DERIVED = {"read": False}  # field metadata: not read from the map (worked out from other fields)


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    """One adapted module; `name` is the original name (no `decoder.`), `category` is filled from it."""

    name: ModuleName
    fisher_score: float = field(metadata=_absent(0.0))
    fisher_cross_run_std: float = field(metadata=_absent(0.0))
    effective_rank: int | None  # weight effective rank (reference's spectral factor); None when not measured
    assigned_rank: Rank  # a map entry without one takes the module's rank_pattern rank
    data_rank: int | None = None
    category: str = field(default="", metadata=_DERIVED)

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

    file: FileName
    sha256: str
    k: int
    seed: int


@dataclass(frozen=True)
class FisherMap:
    """Everything fisher_map.json holds; field meanings are in docs/fisher-map.md.

    `rank_budget {min, max}` on disk is `rank_min`/`rank_max` here; `target_modules` is derived from
    `rank_pattern`. Fields a map may lack (reference or older maps) are None, 0 or empty.
    """

    rank_pattern: dict[ModuleName, Rank]
    alpha_pattern: dict[ModuleName, Alpha]
    modules: tuple[ModuleEntry, ...] = ()
    excluded_modules: tuple[ModuleName, ...] = ()
    version: int = field(default=MAP_VERSION, metadata=_absent(1))  # maps before version 2 carry none
    model_variant: str = ""
    timestep_focus: str = "balanced"
    timestep_range: tuple[float, float] = (0.0, 1.0)
    timestep_params: TimestepParams | None = None
    num_runs: int = 0
    batches_per_run: int = 0
    total_batches: int = 0
    base_rank: int | None = None
    rank_min: int | None = field(default=None, metadata={"path": ("rank_budget", "min")})
    rank_max: int | None = field(default=None, metadata={"path": ("rank_budget", "max")})
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
    low_confidence_modules: tuple[ModuleName, ...] = ()
    content_hash: str | None = None
    report: str | None = None
    init: InitRef | None = None
    extra: dict[str, Any] = field(default_factory=dict, metadata=_DERIVED)  # the fields this sidestep does not know

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
    """Validate a parsed map of version 1 to 3; fields it lacks get their defaults, unknown ones go to `extra`.

    The checks come from the dataclasses' field types (`_Decoder`); only what spans fields is written here.
    """
    d = _Decoder(source)
    if not isinstance(data, dict):
        raise d.fail(f"holds a JSON {type(data).__name__}, not an object")
    version = d.field(data, FisherMap, _VERSION, "")
    if not 1 <= version <= MAP_VERSION:
        raise d.fail(f"has version {version}, but this sidestep reads versions 1 to {MAP_VERSION}")
    for key in ("target_modules", "rank_pattern", "alpha_pattern"):
        if data.get(key) is None:
            raise d.fail(f"lacks the required field '{key}'")
    d.value(data["target_modules"], list[ModuleSuffix], "target_modules")  # written from rank_pattern, checked only
    values = d.fields(_with_assigned_ranks(data), FisherMap, "", skip=("version",))
    ranks, alphas = values["rank_pattern"], values["alpha_pattern"]
    if set(ranks) != set(alphas):
        odd = sorted(set(ranks) ^ set(alphas), key=module_sort_key)[0]
        raise d.fail(f"rank_pattern and alpha_pattern list different modules (e.g. {odd})")
    return FisherMap(**values, version=version, extra={key: value for key, value in data.items() if key not in _KNOWN})


def _with_assigned_ranks(data: dict[str, Any]) -> dict[str, Any]:
    """Module entries without `assigned_rank` (older maps) take their rank from rank_pattern."""
    ranks, modules = data.get("rank_pattern"), data.get("modules")
    if not isinstance(ranks, dict) or not isinstance(modules, list):
        return data
    by_name = {strip_decoder_prefix(k): v for k, v in ranks.items()}
    filled = [dict(entry, assigned_rank=by_name.get(strip_decoder_prefix(entry["name"])))
              if isinstance(entry, dict) and entry.get("assigned_rank") is None and isinstance(entry.get("name"), str)
              else entry for entry in modules]
    return {**data, "modules": filled}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


_VERSION = next(f for f in fields(FisherMap) if f.name == "version")
# Top-level JSON keys the map defines (anything else is kept in `extra`).
_KNOWN = frozenset({f.metadata.get("path", (f.name,))[0] for f in fields(FisherMap) if f.metadata.get("read", True)}
                   | {"target_modules"})
_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
               bool: ("true or false", "true or false values")}
_COUNTS = {2: "two", 3: "three", 4: "four"}


class _WrongType(Exception):
    """A JSON value at `where` that is not of the type `hint` (an Annotated check or a Union may try another)."""

    def __init__(self, where: str, value: Any, hint: Any) -> None:
        super().__init__(where)
        self.where, self.value, self.hint = where, value, hint


class _Decoder:
    """Reads JSON values by the type hints of the map's dataclasses; every failure is one MapError naming the file
    and the field's path (`modules[3].fisher_score`, `rank_pattern[layers.0.mlp.up_proj]`).

    Our own rather than dacite or pydantic: this much code gives the one-sentence messages, the `absent` values of
    older maps and the `Annotated` checks without another dependency or a translation of its error types.
    """

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, what: str) -> MapError:
        return MapError(f"{self.source}: {what}; {_FIX}.")

    def fields(self, obj: dict[str, Any], cls: type, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The constructor arguments of `cls` read from `obj`; its derived fields and `skip` are left out."""
        return {f.name: self.field(obj, cls, f, where) for f in fields(cls)
                if f.metadata.get("read", True) and f.name not in skip}

    def field(self, obj: dict[str, Any], cls: type, f: Field, where: str) -> Any:
        """One field: absent or null gives its `absent` metadata, its default, None if optional, or an error."""
        path = f.metadata.get("path", (f.name,))
        value: Any = obj
        for i, key in enumerate(path):
            if i and not isinstance(value, dict):
                raise self.fail(f"'{_join(where, *path[:i])}' must be an object, not {_show(value)}")
            value = value.get(key)
            if value is None:
                break
        here = _join(where, *path)
        hint = _hints(cls)[f.name]
        if value is not None:
            return self.value(value, hint, here)
        if "absent" in f.metadata:
            return f.metadata["absent"]
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            return f.default_factory()
        if type(None) in get_args(hint):
            return None
        raise self.fail(f"'{where}' lacks '{path[-1]}'" if where else f"lacks the required field '{path[-1]}'")

    def value(self, value: Any, hint: Any, where: str) -> Any:
        """`value` checked against `hint` and converted to what the dataclass holds (tuples, enums, records)."""
        try:
            return self._value(value, hint, where)
        except _WrongType as err:
            raise self.fail(f"'{err.where}' must be {_describe(err.hint)}, not {_show(err.value)}") from None

    def _value(self, value: Any, hint: Any, where: str) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if origin is Annotated:
            check: _Check = hint.__metadata__[0]
            try:
                got = self._value(value, args[0], where)
            except _WrongType:
                got = None
            kept = None if got is None else check.convert(got)
            if kept is None:
                raise self.fail(f"'{where}' holds {_show(value)}, not {check.describe}")
            return kept
        if origin in (Union, types.UnionType):
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self._value(value, arg, where)
                except _WrongType:
                    continue
            raise _WrongType(where, value, hint)
        if hint in (int, bool, str):
            if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
                raise _WrongType(where, value, hint)
            return value
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _WrongType(where, value, hint)
            try:
                return float(value)
            except OverflowError:  # an int too large for a float
                raise _WrongType(where, value, hint) from None
        if isinstance(hint, type) and issubclass(hint, Enum):
            try:
                return hint(value)
            except ValueError:
                raise _WrongType(where, value, hint) from None
        if origin in (tuple, list):
            if not isinstance(value, list):
                raise _WrongType(where, value, hint)
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise _WrongType(where, value, hint)
                return tuple(self._value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            items = [self._value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, dict):
                raise _WrongType(where, value, hint)
            return {self._value(k, args[0], where): self._value(v, args[1], f"{where}[{k}]") for k, v in value.items()}
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise _WrongType(where, value, hint)
            return hint(**self.fields(value, hint, where))
        if hint is Any:
            return value
        raise TypeError(f"the map reader has no rule for {hint!r} at {where}")  # a new field type: teach it here


def _describe(hint: Any, plural: bool = False) -> str:
    """How a message names what a type hint accepts ("an integer", "two numbers", "an object")."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return hint.__metadata__[0].describe
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if set(options) == {int, float}:
            return _TYPE_NAMES[float][plural]
        return " or ".join(_describe(a, plural) for a in options)
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint][plural]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(set(args)) == 1 and len(args) in _COUNTS:
            return f"{_COUNTS[len(args)]} {_describe(args[0], plural=True)}"
        return f"a list of {len(args)} values"
    if origin in (tuple, list):
        return "lists" if plural else "a list"
    return "objects" if plural else "an object"  # dict or a nested record


def _join(where: str, *keys: str) -> str:
    return ".".join(k for k in (where, *keys) if k)


def _show(value: Any) -> str:
    """A value as a message quotes it, cut short (a hostile file may hold huge values)."""
    return repr(value[:60]) if isinstance(value, str) else json.dumps(value)[:40]

# ---- the optional `need` field (version 3, additive) -------------------------------------------------

NEED_FIELD = "need"
PROBE_FIELD = "probe"  # optional, written by --rank-signal probe: the probe's settings and per-module scores


@dataclass(frozen=True, slots=True)
class Concentration:
    """How concentrated the dataset's demand on the modules is (the map's `probe` or `need` field; docs/fisher-map.md).

    Args:
        measure: what is concentrated: "probe loss fall" (maps sized by the probe) or "need".
        top10_share: share of the total, per parameter, held by the top 10% of modules (0.10 = even).
        spread_evenly: True when that share is low enough that a flat LoRA should do as well.
        per_module: original module name -> the measure per rank-1 LoRA parameter.
        loss_fall: the share of the model's loss on the dataset that the probe removed, (before - probed) / before;
            how much this data asks the model to change. None for the need, and for a probe field without losses.
    """

    measure: str
    top10_share: float
    spread_evenly: bool
    per_module: dict[str, float]
    loss_fall: float | None = None


def modules_at_rank_max(fmap: FisherMap) -> int:
    """How many adapted modules sit at the map's --rank-max (0 for maps that record none)."""
    return sum(r == fmap.rank_max for r in fmap.rank_pattern.values()) if fmap.rank_max else 0


def concentration_summary(fmap: FisherMap) -> Concentration | None:
    """The map's concentration: from its `probe` field when it has one (the default signal), else its `need` field;
    None when it has neither (older maps, or an analysis without sketches).

    Both travel in `FisherMap.extra`, so maps without them read exactly as before; a malformed one counts as absent.
    """
    found = concentrations(fmap)
    return next(iter(found.values()), None)


def concentrations(fmap: FisherMap) -> dict[str, Concentration]:
    """Every concentration the map records, keyed by field ("probe" first, then "need"); malformed ones left out."""
    found = {}
    for name, measure, key in ((PROBE_FIELD, "probe loss fall", "score"), (NEED_FIELD, "need", "need_per_param")):
        raw = fmap.extra.get(name)
        try:
            share = float(raw["top10_share"])
            modules = {str(k): float(v[key]) for k, v in raw["per_module"].items()}
            found[name] = Concentration(measure, share, bool(raw["spread_evenly"]), modules,
                                        _relative_fall(raw) if name == PROBE_FIELD else None)
        except (TypeError, KeyError, ValueError, AttributeError):
            continue
    return found


@dataclass(frozen=True, slots=True)
class SignalShares:
    """Each module's share of the measure that set a map's ranks (what the preview ranks its top modules by)."""

    measure: str  # "the probe's loss fall" or "the need"
    of_module: dict[str, float]  # they add up to about 1; a negative probe share: its adapter raised the loss


def signal_shares(fmap: FisherMap) -> SignalShares | None:
    """The shares of the probe's loss fall (a probe map) or of the need (a need map), from the map's optional
    field; None for the Fisher-based signals, and for a map whose field is absent or unusable."""
    try:  # the map stores --rank-signal as text (config imports this module, not the other way round)
        if fmap.rank_signal == "probe":
            raw = fmap.extra[PROBE_FIELD]
            fall = float(raw["loss_before"]) - float(raw["loss_probed"])
            shares = {str(k): float(v["loss_share"]) / fall for k, v in raw["per_module"].items()}
            return _usable(SignalShares("the probe's loss fall", shares), fall)
        if fmap.rank_signal == "need":
            need = {str(k): max(float(v["need"]), 0.0) for k, v in fmap.extra[NEED_FIELD]["per_module"].items()}
            total = sum(need.values())
            return _usable(SignalShares("the need", {k: v / total for k, v in need.items()}), total)
    except (TypeError, KeyError, ValueError, AttributeError, ZeroDivisionError):
        pass  # an old probe field (loss_rise, no loss_share) or a malformed one: rank by Fisher score instead
    return None


def _usable(shares: SignalShares, total: float) -> SignalShares | None:
    return shares if total > 0 and all(map(math.isfinite, shares.of_module.values())) else None


def _relative_fall(raw: dict) -> float | None:
    """(loss_before - loss_probed) / loss_before of a probe field; None when the losses are missing or unusable."""
    try:
        before, probed = float(raw["loss_before"]), float(raw["loss_probed"])
    except (TypeError, KeyError, ValueError):
        return None
    if not (math.isfinite(before) and math.isfinite(probed)) or before <= 0:
        return None
    return (before - probed) / before
