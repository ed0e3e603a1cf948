"""Ask for one field of a config dataclass, typed by the field's annotation and judged by the dataclass itself.

The prompt text comes from the field's `help` metadata (the CLI's help), the default from the dataclass,
and every answer is checked by building the config: the wizard never re-implements a rule.
"""

from __future__ import annotations

import functools
import types
import typing
from enum import Enum
from typing import Any, Callable, Mapping

from sidestep.errors import SidestepError
from sidestep.wizard.asker import Asker
from sidestep.wizard.steps import help_of

__all__ = ["ask_field", "field_kind", "problem_of"]

NONE_WORDS = ("", "none", "-")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_kind(cls: type, name: str) -> tuple[type, bool]:
    """(base type, optional?) of a dataclass field: `int | None` -> (int, True)."""
    hint = _hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    if typing.get_origin(hint) is tuple:
        return tuple, False
    return hint, False


def ask_field(asker: Asker, cls: type, name: str, default: Any, check: Callable[[Any], str | None],
              label: str | None = None, **bounds: Any) -> Any:
    """Ask for field `name` of `cls`; `check(value)` returns the config's error sentence or None."""
    kind, optional = field_kind(cls, name)
    helptext = help_of(cls, name)
    message = f"{label or _label(name)}" + (f" — {helptext}" if helptext else "")
    if isinstance(kind, type) and issubclass(kind, Enum):
        return _until_ok(asker, check, lambda: asker.choice(message, list(kind), default=_enum(kind, default)))
    if kind is bool:
        return _until_ok(asker, check, lambda: asker.confirm(message, default=bool(default)))
    if optional or kind is tuple or kind is str:
        return _ask_as_text(asker, kind, optional, message, default, check)
    if kind is int:
        return asker.integer(message, default=default, validate=check, **bounds)
    if kind is float:
        return asker.number(message, default=default, validate=check, **bounds)
    raise TypeError(f"no prompt for {cls.__name__}.{name} of type {kind!r}")


def _ask_as_text(asker: Asker, kind: type, optional: bool, message: str, default: Any,
                 check: Callable[[Any], str | None]) -> Any:
    """Optional numbers, strings and tuples are typed as text; `none` (or empty, when optional) clears."""
    convert = _converter(kind, optional)

    def judge(raw: str) -> str | None:
        try:
            value = convert(raw)
        except ValueError as err:
            return str(err)
        return check(value)

    shown = "none" if default is None else (",".join(default) if isinstance(default, tuple) else f"{default}")
    hint = " (none = not set)" if optional else ""
    raw = asker.text(message + hint, default=shown, validate=judge)
    return convert(raw)


def _converter(kind: type, optional: bool) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        text = raw.strip()
        if optional and text.lower() in NONE_WORDS:
            return None
        if kind is tuple:
            return tuple(part.strip() for part in text.replace(",", " ").split() if part.strip())
        if kind is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a whole number.") from None
        if kind is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a number.") from None
        return text

    return convert


def _until_ok(asker: Asker, check: Callable[[Any], str | None], ask: Callable[[], Any]) -> Any:
    while True:
        value = ask()
        problem = check(value)
        if problem is None:
            return value
        asker.say(f"[red]{problem}[/]")


def _enum(kind: type[Enum], value: Any) -> Any:
    try:
        return kind(value.value if isinstance(value, Enum) else value)
    except ValueError:
        return None


_LABELS: Mapping[str, str] = {
    "lr": "Learning rate",
    "cfg_dropout": "CFG dropout",
    "max_grad_norm": "Max gradient norm",
    "max_latent_length": "Max latent length (frames, 25 per second)",
    "grad_accum": "Gradient accumulation steps",
    "timestep_mode": "Timestep mode (continuous or discrete)",
}


def _label(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " ").capitalize())


def problem_of(call: Callable[[], Any]) -> str | None:
    """Run `call` (a config constructor, a reader, a check); its SidestepError sentence, or None when it passes.

    The shape every wizard validator needs: the library's own one-sentence error, shown under the question."""
    try:
        call()
    except SidestepError as err:
        return str(err)
    return None
