"""The step-list engine every flow uses: questions in order, `Back` moves one question back.

Answers live in one dict keyed by step; a step asks with its previous answer as the default, so going back
shows what the user typed before. `Back` at the first step leaves the flow (to the caller, usually the menu).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, MutableMapping, Sequence

from sidestep.wizard.asker import Asker, Back

__all__ = ["Step", "run_steps", "default_of", "help_of"]

Answers = MutableMapping[str, Any]


def _always(_answers: Answers) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    """One question: `ask(asker, answers)` returns the answer stored under `key`; skipped when `when` is false."""

    key: str
    ask: Callable[[Asker, Answers], Any]
    when: Callable[[Answers], bool] = _always


def run_steps(asker: Asker, steps: Sequence[Step], answers: Answers | None = None) -> Answers:
    """Ask every applicable step in order; `Back` re-asks the previously answered one.

    Raises:
        Back: when the user goes back from the first question.
    """
    answers = {} if answers is None else answers
    history: list[int] = []
    index = 0
    while index < len(steps):
        step = steps[index]
        if not step.when(answers):
            index += 1
            continue
        try:
            answers[step.key] = step.ask(asker, answers)
        except Back:
            if not history:
                raise
            index = history.pop()
            continue
        history.append(index)
        index += 1
    return answers


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass field `name`: the wizard never keeps a second set of defaults."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            return None
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def help_of(cls: type, name: str, fallback: str = "") -> str:
    """The `help` metadata of a dataclass field (shared with the CLI's help text)."""
    for f in fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", fallback))
    return fallback
