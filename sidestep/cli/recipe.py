"""Recipes: `--config FILE` and `--preset NAME` fill the options the command line left at their defaults.

Precedence, lowest first: the option defaults, the preset (from --preset, or a `preset` key in the file), the
file, the flags typed on the command line. A file is TOML (`.toml`) or JSON, with option names as keys
(`max_steps` or `max-steps`); a previous run's `run.json` works too: its resolved config, model and runtime are
read, and `resume`/`overwrite` (facts about that folder, not the recipe) are left out.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sidestep.display import output
from sidestep.errors import ConfigError

__all__ = ["Recipe", "apply_recipe", "read_recipe_file"]

_PATHS = frozenset({"dataset_dir", "output_dir", "checkpoint_dir", "val_dir", "sample_prompts", "output_path"})
_NOT_A_RECIPE = frozenset({"resume", "overwrite"})  # in run.json: the state of that folder, not how to train
_META = frozenset({"config_file", "preset", "json"})  # options that choose the recipe or the output format


@dataclass(frozen=True)
class Recipe:
    """The options after layering, where each non-default one came from, and which ones the user chose."""

    values: dict[str, Any]
    sources: dict[str, str]  # option -> "the command line" | file name | "preset NAME"
    chosen: frozenset[str]  # set on the command line, in the file (run.json: differing from the default) or preset

    def lines(self) -> list[str]:
        """One line per source: which values came from the file, the preset and the command line."""
        by_source: dict[str, list[str]] = {}
        for name, source in sorted(self.sources.items()):
            by_source.setdefault(source, []).append(f"{name}={_shown(self.values[name])}")
        return [f"From {source}: " + ", ".join(items) for source, items in by_source.items()]

    def show(self) -> None:
        for line in self.lines():
            output.info(line)


def read_recipe_file(path: Path, known: Iterable[str]) -> tuple[dict[str, Any], bool]:
    """The options in a TOML/JSON recipe or a run.json, and whether it was a run.json; ConfigError on any problem."""
    path = Path(path).expanduser()
    known = set(known)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot be read ({getattr(err, 'strerror', None) or err}).") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML ({err}).") from None
    except (ValueError, RecursionError):
        raise ConfigError(f"--config {path}: not valid JSON (TOML files must end in .toml).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of options at the top level.")
    if isinstance(data.get("config"), dict) and "tool" in data:  # a run.json
        return _from_run_json(data, known), True
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - known - {"preset"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}.")
    return values, False


def _from_run_json(data: dict[str, Any], known: set[str]) -> dict[str, Any]:
    values = {k: v for k, v in data["config"].items() if k not in _NOT_A_RECIPE}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    runtime = data.get("runtime") if isinstance(data.get("runtime"), dict) else {}
    for key, value in (("model", model.get("name")), ("checkpoint_dir", model.get("checkpoint_dir")),
                       ("device", runtime.get("device")), ("precision", runtime.get("precision")),
                       ("gradient_checkpointing", runtime.get("gradient_checkpointing"))):
        if value is not None:
            values[key] = value
    return {k: v for k, v in values.items() if k in known}  # a run.json records more than a command takes


def apply_recipe(ctx: Any, config_file: Path | None, preset: str | None, extra: Iterable[str] = ()) -> Recipe:
    """Layer preset < file < command line over the parsed options of the running command (a click/typer
    Context). `extra`: config fields without a flag that a file may still set (e.g. weight_decay)."""
    params = dict(ctx.params)
    known = (set(params) | set(extra)) - _META
    typed = {name for name in known & set(params) if _source(ctx, name) in _TYPED}
    layers: list[tuple[str, dict[str, Any], bool]] = []
    file_values: dict[str, Any] = {}
    from_run_json = False
    if config_file is not None:
        file_values, from_run_json = read_recipe_file(config_file, known)
    preset = preset or file_values.pop("preset", None)
    if preset is not None:
        layers.append(_preset_layer(str(preset), known))
    if config_file is not None:
        layers.append((Path(config_file).name, file_values, from_run_json))
    values, sources, chosen = dict(params), {}, set(typed)
    for source, layer, whole_record in layers:
        for name, value in layer.items():
            if name in typed:
                continue
            value = Path(value).expanduser() if name in _PATHS and isinstance(value, str) else value
            values[name], sources[name] = value, source
            if not whole_record or value != params.get(name):
                chosen.add(name)
    for name in typed:
        sources[name] = "the command line"
    return Recipe(values, sources, frozenset(chosen))


def _preset_layer(name: str, known: set[str]) -> tuple[str, dict[str, Any], bool]:
    from sidestep.wizard.presets import load_preset, overlapping  # presets are the wizard's; the CLI shares them

    found = load_preset(name)
    return f"preset {found.name}", overlapping(found, known), False


_TYPED = ("COMMANDLINE", "ENVIRONMENT")


def _source(ctx: Any, name: str) -> str:
    source = ctx.get_parameter_source(name)  # typer vendors click: compare by name, not by enum class
    return getattr(source, "name", "DEFAULT")


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(getattr(value, "value", value))
