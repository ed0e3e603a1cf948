"""Which modules get an adapter and at what rank: flat from the flags, or Adaptive Rank from fisher_map.json.

An `AdapterPlan` names modules in the ORIGINAL ACE-Step naming (`layers.3.self_attn.q_proj`); the peft
config for the diffusers model we train is derived from it, and so is the `adapter_config.json` we save.
peft matches every `target_modules` entry and `rank_pattern` key at the end of a module name at a dot
boundary, so full paths such as `layers.1.self_attn.to_q` never touch `layers.11.…` (tested on 24 layers).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig

from sidestep.analysis.fisher_map import MAP_FILENAME, TURBO_MAP_ADVICE, FisherMap, read_map
from sidestep.analysis.modules import (PROJECTIONS, Category, ModuleShape, category_of, module_shapes,
                                      module_sort_key, strip_decoder_prefix, targetable_modules)
from sidestep.data import dataset_hash
from sidestep.errors import ConfigError, MapError
from sidestep.models.convert import diffusers_to_original, original_to_diffusers
from sidestep.training.config import TARGET_GROUPS, AdapterKind, InitMode, TrainConfig
from sidestep.training.grad_init import InitPlan, apply_gradient_init

__all__ = ["AdapterPlan", "MapSummary", "plan_adapter", "flat_plan", "map_plan", "clamp_ranks", "map_warnings", "resolve_targets",
           "peft_config", "attach_adapter", "module_shapes", "summarize", "check_plan_fits", "ADAPTER_PARAM_MARKERS"]

Naming = Literal["diffusers", "original"]
# Substrings that mark a parameter as part of an adapter (LoRA/DoRA, LoHa, LoKr).
ADAPTER_PARAM_MARKERS = (".lora_", ".hada_", ".lokr_")


_DEFAULT_RANK = next(f.default for f in fields(TrainConfig) if f.name == "rank")


@dataclass(frozen=True)
class AdapterPlan:
    """Every adapted module with its rank and alpha (original names), and where the choice came from."""

    kind: AdapterKind
    ranks: dict[str, int]
    alphas: dict[str, float]
    dropout: float
    base_rank: int
    base_alpha: float
    adaptive: bool = False
    map_path: Path | None = None
    overrides: tuple[str, ...] = ()  # user flags the map replaced, e.g. "--rank 64"
    notices: tuple[str, ...] = field(default=(), compare=False)  # staleness and fragility warnings

    @property
    def modules(self) -> list[str]:
        return sorted(self.ranks, key=module_sort_key)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "ranks": dict(self.ranks), "alphas": dict(self.alphas),
                "dropout": self.dropout, "base_rank": self.base_rank, "base_alpha": self.base_alpha,
                "adaptive": self.adaptive, "map_path": None if self.map_path is None else str(self.map_path)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AdapterPlan":
        return cls(AdapterKind(data["kind"]), {k: int(v) for k, v in data["ranks"].items()},
                   {k: float(v) for k, v in data["alphas"].items()}, float(data["dropout"]), int(data["base_rank"]),
                   float(data["base_alpha"]), bool(data["adaptive"]),
                   None if data.get("map_path") is None else Path(data["map_path"]))


@dataclass(frozen=True)
class MapSummary:
    """What "Preprocessing++ map detected" prints: coverage per category, rank histogram, parameter cost."""

    map_path: Path
    per_category: dict[str, tuple[int, int]]  # category -> (adapted, targetable)
    rank_histogram: dict[int, int]  # rank -> number of modules
    trainable_params: int
    flat_params: int  # a flat --rank adapter on every module of the chosen groups
    flat_rank: int
    overrides: tuple[str, ...]


def resolve_targets(items: tuple[str, ...], num_layers: int) -> list[str]:
    """`--target-modules` entries (groups, projection names in either naming, or full paths) -> original names."""
    every = targetable_modules(num_layers)
    chosen: set[str] = set()
    for item in items:
        if item in TARGET_GROUPS:
            hits = [name for name in every if category_of(name).value == item]
        else:
            wanted = diffusers_to_original(strip_decoder_prefix(item))
            hits = [name for name in every if name == wanted or name.endswith("." + wanted)]
        if not hits:
            suffixes = ", ".join(p.split(".")[1] for p in PROJECTIONS[:4] + PROJECTIONS[8:])
            raise ConfigError(f"--target-modules {item!r} matches no module of this {num_layers}-layer model; use "
                              f"self-attn, cross-attn, mlp or names such as {suffixes}, cross_attn.k_proj.")
        chosen.update(hits)
    return sorted(chosen, key=module_sort_key)


def flat_plan(config: TrainConfig, num_layers: int, notices: tuple[str, ...] = ()) -> AdapterPlan:
    """One rank and alpha for every module of the chosen groups or names."""
    names = resolve_targets(config.target_modules, num_layers)
    alpha = float(config.alpha)
    return AdapterPlan(config.adapter, dict.fromkeys(names, config.rank), dict.fromkeys(names, alpha),
                       config.dropout, config.rank, alpha, notices=notices)


def map_plan(fmap: FisherMap, config: TrainConfig, source: Path, num_layers: int,
             notices: tuple[str, ...] = (), explicit: frozenset[str] | None = None) -> AdapterPlan:
    """Adaptive Rank: exactly the map's modules, each with the map's rank and alpha."""
    beyond = [name for name in fmap.adapted_modules if int(name.split(".")[1]) >= num_layers]
    if beyond:
        raise MapError(f"{source}: adapts {beyond[0]}, but the model has only {num_layers} layers; rerun "
                       f"`sidestep analyze` for this model or pass --ignore-fisher-map.")
    if not fmap.rank_pattern:
        raise MapError(f"{source}: adapts no module (empty rank_pattern); rerun `sidestep analyze` or pass --ignore-fisher-map.")
    ranks = {name: int(fmap.rank_pattern[name]) for name in fmap.adapted_modules}
    alphas = {name: float(fmap.alpha_of(name) or 2 * ranks[name]) for name in ranks}
    base_rank = fmap.base_rank or collections.Counter(ranks.values()).most_common(1)[0][0]
    overrides = _overrides(config, explicit)
    return AdapterPlan(config.adapter, ranks, alphas, config.dropout, base_rank,
                       float(fmap.alpha_ratio or 2.0) * base_rank, True, source, overrides, notices)


def _overrides(config: TrainConfig, explicit: frozenset[str] | None) -> tuple[str, ...]:
    """The flags the map replaces that the user set: `explicit` names them (the CLI knows); without it (a library
    call, the wizard) those whose value differs from the default count as set."""
    flags = {"rank": f"--rank {config.rank}", "alpha": f"--alpha {config.alpha:g}",
             "target_modules": f"--target-modules {','.join(config.target_modules)}"}
    if explicit is None:
        defaults = {"rank": _DEFAULT_RANK, "alpha": 2.0 * config.rank, "target_modules": TARGET_GROUPS}
        explicit = frozenset(n for n in flags if getattr(config, n) != defaults[n])
    return tuple(flag for name, flag in flags.items() if name in explicit)


def clamp_ranks(plan: AdapterPlan, shapes: dict[str, ModuleShape]) -> tuple[AdapterPlan, str | None]:
    """A flat rank above min(in, out) of a module buys nothing there: clamp it (alpha scaled alike, so the
    strength alpha/rank stays); returns the plan and the sentence saying so (None when nothing changed)."""
    caps = {n: min(shapes[n].in_features, shapes[n].out_features) for n in plan.ranks if n in shapes}
    over = sorted((n for n, cap in caps.items() if plan.ranks[n] > cap), key=module_sort_key)
    if not over:
        return plan, None
    ranks = {n: min(r, caps.get(n, r)) for n, r in plan.ranks.items()}
    alphas = {n: a * ranks[n] / plan.ranks[n] for n, a in plan.alphas.items()}
    first = shapes[over[0]]
    notice = (f"--rank {plan.base_rank} is more than {len(over)} module(s) can hold (e.g. {over[0]} is "
              f"{first.in_features}x{first.out_features}); their ranks are clamped to min(in, out), alpha alike.")
    return replace(plan, ranks=ranks, alphas=alphas), notice


def map_warnings(fmap: FisherMap, source: Path, variant: str, is_turbo: bool, num_layers: int,
                 dataset_dir: Path) -> list[str]:
    """Staleness (variant, layer count, dataset fingerprint) and the turbo fragility advice; never fatal."""
    out = []
    if fmap.model_variant and fmap.model_variant != variant:
        out.append(f"{source.name} was made for the {fmap.model_variant} model but this run trains {variant}; "
                   "rerun `sidestep analyze` with --model " + variant + " for ranks that fit (continuing).")
    if fmap.num_hidden_layers is not None and fmap.num_hidden_layers != num_layers:
        out.append(f"{source.name} was made for a {fmap.num_hidden_layers}-layer model but this one has "
                   f"{num_layers} layers (continuing).")
    current = dataset_hash(dataset_dir)
    if fmap.dataset_hash and fmap.dataset_hash != current:
        out.append(f"The dataset in {dataset_dir} changed since {source.name} was made (fingerprint "
                   f"{fmap.dataset_hash} -> {current}); rerun `sidestep analyze` to refresh it (continuing).")
    if is_turbo:
        out.append(TURBO_MAP_ADVICE)
    return out


def plan_adapter(config: TrainConfig, variant: str, is_turbo: bool, num_layers: int,
                 explicit: frozenset[str] | None = None) -> AdapterPlan:
    """Adaptive Rank when `<dataset>/fisher_map.json` exists and is not ignored, else flat.

    `explicit`: the TrainConfig fields the user set (for the "not used" list of the map summary)."""
    source = config.dataset_dir / MAP_FILENAME
    if config.ignore_fisher_map or not source.exists():
        return flat_plan(config, num_layers)
    fmap = read_map(source)  # MapError names the file and suggests --ignore-fisher-map
    notices = map_warnings(fmap, source, variant, is_turbo, num_layers, config.dataset_dir)
    return map_plan(fmap, config, source, num_layers, tuple(notices), explicit)


def peft_config(plan: AdapterPlan, naming: Naming = "diffusers", task_type: str | None = None) -> PeftConfig:
    """The peft config of a plan, with module names for the diffusers model or the original decoder."""
    rename = original_to_diffusers if naming == "diffusers" else (lambda name: name)
    targets = [rename(name) for name in plan.modules]
    ranks = {rename(n): r for n, r in plan.ranks.items() if r != plan.base_rank or plan.adaptive}
    alphas = {rename(n): _num(a) for n, a in plan.alphas.items() if a != plan.base_alpha or plan.adaptive}
    common = dict(target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas, task_type=task_type)
    if plan.kind in (AdapterKind.LORA, AdapterKind.DORA):
        return LoraConfig(r=plan.base_rank, lora_alpha=_num(plan.base_alpha), lora_dropout=plan.dropout,
                          use_dora=plan.kind is AdapterKind.DORA, **common)
    cls = LoKrConfig if plan.kind is AdapterKind.LOKR else LoHaConfig
    return cls(r=plan.base_rank, alpha=_num(plan.base_alpha), rank_dropout=plan.dropout, **common)


def attach_adapter(transformer: torch.nn.Module, plan: AdapterPlan, init: InitPlan | None = None) -> int:
    """Inject the plan's adapter (fp32 master weights) and check that exactly its parameters train.

    `init` from `grad_init.resolve_init`: None or mode DEFAULT keeps peft's init; GRADIENT sets every LoRA A
    from its stored basis (B stays zero, so the output is unchanged).
    """
    if init is not None and init.mode is InitMode.GRADIENT and plan.kind not in (AdapterKind.LORA, AdapterKind.DORA):
        raise ConfigError(f"--init gradient does not apply to --adapter {plan.kind.value}; use --init default.")
    transformer.add_adapter(peft_config(plan, "diffusers"))
    adapted: set[str] = set()
    total = 0
    for name, param in transformer.named_parameters():
        if not param.requires_grad:
            continue
        module, marker = _split_adapter_name(name)
        if marker is None:
            raise ConfigError(f"Internal check failed: {name} would train but is not an adapter weight.")
        adapted.add(diffusers_to_original(module))
        total += param.numel()
    if adapted != set(plan.ranks):
        odd = sorted(adapted ^ set(plan.ranks))[:3]
        raise ConfigError(f"Internal check failed: the injected adapter differs from the plan on {odd}.")
    cast_training_params(transformer, dtype=torch.float32)  # fp32 master weights for exactly the checked parameters
    if init is not None and init.mode is InitMode.GRADIENT:
        apply_gradient_init(transformer, plan.ranks, init.bases)  # after the fp32 cast: A is set at full precision
    return total


def check_plan_fits(plan: AdapterPlan, shapes: dict[str, ModuleShape]) -> None:
    """A map's modules must exist in this model, each rank at most min(in, out) and each alpha a finite positive number."""
    source = plan.map_path or Path(MAP_FILENAME)
    fix = "rerun `sidestep analyze` for this model or pass --ignore-fisher-map"
    for name in plan.modules:
        shape = shapes.get(name)
        if shape is None:
            raise MapError(f"{source}: adapts {name}, which this model does not have; {fix}.")
        rank, alpha = plan.ranks[name], plan.alphas[name]
        if not 0 < rank <= min(shape.in_features, shape.out_features):
            raise MapError(f"{source}: gives {name} the rank {rank}, but that module is {shape.in_features}x"
                           f"{shape.out_features} (rank at most {min(shape.in_features, shape.out_features)}); {fix}.")
        if not (math.isfinite(alpha) and alpha > 0):
            raise MapError(f"{source}: gives {name} the alpha {alpha}, not a finite positive number; {fix}.")


def summarize(plan: AdapterPlan, shapes: dict[str, ModuleShape], trainable_params: int, flat_rank: int) -> MapSummary:
    """The compact summary printed when a map is used; `flat_params` is a flat `flat_rank` LoRA on every target."""
    per_category = {}
    for cat in Category:
        members = [n for n in shapes if category_of(n) is cat]
        per_category[cat.value] = (sum(n in plan.ranks for n in members), len(members))
    histogram = dict(sorted(collections.Counter(plan.ranks.values()).items()))
    flat = sum(shape.lora_params(flat_rank) for shape in shapes.values())
    return MapSummary(plan.map_path or Path(MAP_FILENAME), per_category, histogram, trainable_params, flat, flat_rank,
                      plan.overrides)


def _split_adapter_name(param_name: str) -> tuple[str, str | None]:
    for marker in ADAPTER_PARAM_MARKERS:
        head, sep, _ = param_name.partition(marker)
        if sep:
            return head, marker
    return param_name, None


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)

