"""How the wizard asks: the `Asker` protocol, the real terminal (questionary) and a scripted one for tests.

Every prompt understands two escapes. Typing `b` (or choosing "Back") raises `Back`, so the flow returns to
the previous question; Ctrl-C raises `Cancel`, which takes the user back to the main menu (or quits there).
Parsing and bounds checks are shared by both implementations, so a scripted answer is judged exactly like
a typed one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = [
    "BACK_WORD", "Asker", "Back", "Cancel", "Option", "Progressor", "QuestionaryAsker", "ScriptExhausted",
    "ScriptedAsker", "Validator", "as_options", "flush_typeahead", "parse_float", "parse_folder", "parse_int",
    "stdin_is_terminal",
]

BACK_WORD = "b"
FILTER_FROM = 8  # lists at least this long get type-to-filter
Validator = Callable[[Any], "str | None"]  # returns an error sentence, or None when the value is fine
Progressor = Callable[..., None]  # update(completed, total=None, description=None); .stop() ends the bar early


class Back(Exception):
    """The user asked to return to the previous question."""


class Cancel(Exception):
    """Ctrl-C at a prompt: return to the main menu (quit when already there)."""


@dataclass(frozen=True)
class Option:
    """One entry of a choice list: what is shown, what is returned, and an optional one-line meaning."""

    label: str
    value: Any
    hint: str = ""

    @property
    def title(self) -> str:
        return f"{self.label} — {self.hint}" if self.hint else self.label


def as_options(items: Sequence[Option | Enum | str] | type[Enum]) -> list[Option]:
    """Accept options, an Enum class, enum members or plain strings."""
    out = []
    for item in items:
        if isinstance(item, Option):
            out.append(item)
        elif isinstance(item, Enum):
            out.append(Option(str(item.value), item))
        else:
            out.append(Option(str(item), item))
    return out


class Asker(Protocol):
    """What a flow may ask and show. Every `ask`-like method may raise `Back` or `Cancel`."""

    def text(self, message: str, *, default: str = "", validate: Validator | None = None) -> str: ...

    def integer(self, message: str, *, default: int | None = None, lo: int | None = None, hi: int | None = None,
                validate: Validator | None = None) -> int: ...

    def number(self, message: str, *, default: float | None = None, lo: float | None = None,
               hi: float | None = None, validate: Validator | None = None) -> float: ...

    def choice(self, message: str, options: Sequence[Option | Enum | str] | type[Enum], *, default: Any = None,
               back: bool = True) -> Any: ...

    def folder(self, message: str, *, default: Path | str | None = None, must_exist: bool = True,
               validate: Validator | None = None) -> Path: ...

    def confirm(self, message: str, *, default: bool = False) -> bool: ...

    def say(self, message: Any) -> None: ...

    def progress(self, label: str) -> contextlib.AbstractContextManager[Progressor]: ...


# ---- parsing shared by both implementations ----------------------------------------------------------------


def parse_int(raw: str, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number within [lo, hi]; ValueError with a one-sentence reason otherwise."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{raw.strip()!r} is not a whole number.") from None
    _check_bounds(value, lo, hi)
    return value


def parse_float(raw: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number (1e-4 is fine) within [lo, hi]; ValueError otherwise."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{raw.strip()!r} is not a number (examples: 0.5, 1e-4).") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{raw.strip()!r} is not a finite number.")
    _check_bounds(value, lo, hi)
    return value


def parse_folder(raw: str, must_exist: bool = True) -> Path:
    """An absolute folder path (`~` expanded); ValueError when it must exist and does not."""
    text = raw.strip()
    if not text:
        raise ValueError("Type a folder path.")
    path = Path(text).expanduser().resolve()
    if must_exist and not path.is_dir():
        raise ValueError(f"{path} does not exist or is not a folder.")
    if not must_exist and path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder.")
    return path


def _check_bounds(value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ValueError(f"{value:g} is outside {lo:g}..{hi:g}.")
    if lo is not None and value < lo:
        raise ValueError(f"{value:g} is below the minimum {lo:g}.")
    if hi is not None and value > hi:
        raise ValueError(f"{value:g} is above the maximum {hi:g}.")


def _judge(parse: Callable[[str], Any], validate: Validator | None, raw: str) -> tuple[Any, str | None]:
    """Parse `raw` then apply `validate`: (value, None) or (None, error sentence)."""
    try:
        value = parse(raw)
    except ValueError as err:
        return None, str(err)
    problem = validate(value) if validate else None
    return (None, problem) if problem else (value, None)


def _is_back(raw: Any) -> bool:
    return isinstance(raw, str) and raw.strip().lower() == BACK_WORD


def _shown_default(default: Any) -> str:
    if default is None:
        return ""
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


# ---- scripted (tests) ----------------------------------------------------------------------------------------


class ScriptExhausted(AssertionError):
    """A test's script ran out of answers while the wizard was still asking."""


CANCEL = object()  # put in a script to simulate Ctrl-C at that prompt


@dataclass
class Asked:
    kind: str
    message: str
    default: Any
    options: tuple[str, ...] = ()


@dataclass
class ScriptedAsker:
    """Answers prompts from a list of strings, as if typed: "" takes the default, "b" goes back.

    For a choice, an answer matches an option's label, its value's string form, or a unique substring of
    its label (like type-to-filter). `CANCEL` simulates Ctrl-C. Everything asked is kept in `asked`,
    every rejected answer's reason in `errors`, everything shown in `said`.
    """

    answers: list[Any]
    asked: list[Asked] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    said: list[Any] = field(default_factory=list)
    progress_updates: list[tuple] = field(default_factory=list)

    def _next(self, kind: str, message: str, default: Any, options: tuple[str, ...] = ()) -> Any:
        self.asked.append(Asked(kind, message, default, options))
        if not self.answers:
            raise ScriptExhausted(f"no scripted answer left for {kind} prompt {message!r}")
        raw = self.answers.pop(0)
        if raw is CANCEL:
            raise Cancel()
        if _is_back(raw):
            raise Back()
        return raw

    def _typed(self, kind: str, message: str, default: Any, parse: Callable[[str], Any],
               validate: Validator | None) -> Any:
        while True:
            raw = self._next(kind, message, default)
            raw = _shown_default(default) if raw == "" else str(raw)
            value, problem = _judge(parse, validate, raw)
            if problem is None:
                return value
            self.errors.append(problem)

    def text(self, message: str, *, default: str = "", validate: Validator | None = None) -> str:
        return self._typed("text", message, default, lambda raw: raw.strip(), validate)

    def integer(self, message: str, *, default: int | None = None, lo: int | None = None, hi: int | None = None,
                validate: Validator | None = None) -> int:
        return self._typed("integer", message, default, lambda raw: parse_int(raw, lo, hi), validate)

    def number(self, message: str, *, default: float | None = None, lo: float | None = None,
               hi: float | None = None, validate: Validator | None = None) -> float:
        return self._typed("number", message, default, lambda raw: parse_float(raw, lo, hi), validate)

    def folder(self, message: str, *, default: Path | str | None = None, must_exist: bool = True,
               validate: Validator | None = None) -> Path:
        return self._typed("folder", message, default, lambda raw: parse_folder(raw, must_exist), validate)

    def choice(self, message: str, options: Sequence[Option | Enum | str] | type[Enum], *, default: Any = None,
               back: bool = True) -> Any:
        opts = as_options(options)
        while True:
            raw = self._next("choice", message, default, tuple(o.label for o in opts))
            if raw == "":
                if default is None:
                    return opts[0].value
                return default
            picked = _match_option(opts, str(raw))
            if picked is not None:
                return picked.value
            self.errors.append(f"{raw!r} matches none of: {', '.join(o.label for o in opts)}")

    def confirm(self, message: str, *, default: bool = False) -> bool:
        while True:
            raw = self._next("confirm", message, default)
            if raw == "":
                return default
            if isinstance(raw, bool):
                return raw
            word = str(raw).strip().lower()
            if word in ("y", "yes"):
                return True
            if word in ("n", "no"):
                return False
            self.errors.append(f"{raw!r} is not y or n")

    def say(self, message: Any) -> None:
        self.said.append(message)

    @contextlib.contextmanager
    def progress(self, label: str) -> Iterator[Progressor]:
        def update(completed: float, total: float | None = None, description: str | None = None) -> None:
            self.progress_updates.append((label, completed, total, description))

        update.stop = lambda: None  # type: ignore[attr-defined]
        yield update

    def said_text(self) -> str:
        """Everything shown so far as plain text (rich renderables rendered without colour)."""
        console = Console(width=120, record=True, file=_NullFile(), color_system=None)
        for item in self.said:
            console.print(item, soft_wrap=isinstance(item, str))
        return console.export_text()


class _NullFile:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _match_option(opts: list[Option], raw: str) -> Option | None:
    text = raw.strip().lower()
    for opt in opts:
        value = opt.value.value if isinstance(opt.value, Enum) else opt.value
        if text in (opt.label.lower(), str(value).lower()):
            return opt
    found = [opt for opt in opts if text in opt.title.lower()]
    return found[0] if len(found) == 1 else None


# ---- the real terminal ----------------------------------------------------------------------------------------


class QuestionaryAsker:
    """Prompts in a real terminal through questionary; output through rich on stdout."""

    def __init__(self, console: Console | None = None, **prompt_io: Any) -> None:
        """`prompt_io` (prompt_toolkit `input=`/`output=`) lets tests type into the real prompts."""
        self.console = console or Console(highlight=False)
        self.prompt_io = prompt_io

    def _ask(self, question: Any) -> Any:
        try:
            return question.unsafe_ask()
        except KeyboardInterrupt:
            raise Cancel() from None

    def _typed(self, message: str, default: Any, parse: Callable[[str], Any], validate: Validator | None,
               path: bool = False) -> Any:
        import questionary

        shown = _shown_default(default)

        def check(raw: str) -> bool | str:
            if _is_back(raw):
                return True
            _value, problem = _judge(parse, validate, raw if raw.strip() else shown)
            return True if problem is None else problem

        extra: dict[str, Any] = {}
        if path:
            from prompt_toolkit.completion import PathCompleter

            # Completion only on Tab: a pop-up opened while typing would swallow the first Enter.
            extra = dict(completer=PathCompleter(only_directories=True, expanduser=True),
                         complete_while_typing=False)
        if shown:
            from prompt_toolkit.formatted_text import FormattedText

            # The default is a placeholder, not pre-typed text, so `b` typed at once means Back.
            extra["placeholder"] = FormattedText([("fg:ansibrightblack", shown)])
        hint = ("(Enter keeps the grey value; " if shown else "(") + ("Tab completes; " if path else "") + "b = back)"
        question = questionary.text(message, validate=check, validate_while_typing=False, instruction=hint, **extra,
                                    **self.prompt_io)
        if shown:
            _enter_takes_default(question, shown)
        _back_after_error(question)
        raw = self._ask(question)
        if _is_back(raw):
            raise Back()
        return _judge(parse, validate, raw if raw.strip() else shown)[0]

    def text(self, message: str, *, default: str = "", validate: Validator | None = None) -> str:
        return self._typed(message, default, lambda raw: raw.strip(), validate)

    def integer(self, message: str, *, default: int | None = None, lo: int | None = None, hi: int | None = None,
                validate: Validator | None = None) -> int:
        return self._typed(message, default, lambda raw: parse_int(raw, lo, hi), validate)

    def number(self, message: str, *, default: float | None = None, lo: float | None = None,
               hi: float | None = None, validate: Validator | None = None) -> float:
        return self._typed(message, default, lambda raw: parse_float(raw, lo, hi), validate)

    def folder(self, message: str, *, default: Path | str | None = None, must_exist: bool = True,
               validate: Validator | None = None) -> Path:
        return self._typed(message, default, lambda raw: parse_folder(raw, must_exist), validate, path=True)

    def choice(self, message: str, options: Sequence[Option | Enum | str] | type[Enum], *, default: Any = None,
               back: bool = True) -> Any:
        import questionary

        opts = as_options(options)
        choices = [questionary.Choice(o.title, value=str(i)) for i, o in enumerate(opts)]
        if back:
            choices.append(questionary.Choice("← Back", value="back"))
        start = next((str(i) for i, o in enumerate(opts) if o.value == default), None)
        searchable = len(opts) >= FILTER_FROM
        hint = "(arrows, Enter; type to filter)" if searchable else "(arrows, Enter" + ("; b = back)" if back else ")")
        question = questionary.select(message, choices=choices, default=start, use_search_filter=searchable,
                                      use_jk_keys=False, instruction=hint, **self.prompt_io)
        if back and not searchable:
            _bind_back(question, "back")
        picked = self._ask(question)
        if picked == "back":
            raise Back()
        return opts[int(picked)].value

    def confirm(self, message: str, *, default: bool = False) -> bool:
        import questionary

        # A confirm often follows a long job; keys pressed while it ran (an Enter to wake the screen) must not
        # answer a question the user has not seen yet.
        flush_typeahead()
        question = questionary.confirm(message, default=default, instruction="(y/n, b = back) ", **self.prompt_io)
        _bind_back(question, "back")
        answer = self._ask(question)
        if answer == "back":
            raise Back()
        return bool(answer)

    def say(self, message: Any) -> None:
        self.console.print(message)

    @contextlib.contextmanager
    def progress(self, label: str) -> Iterator[Progressor]:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(label, total=None)

            def update(completed: float, total: float | None = None, description: str | None = None) -> None:
                extra = {"description": description} if description else {}
                bar.update(task, completed=completed, total=total, **extra)

            update.stop = bar.stop  # type: ignore[attr-defined]
            yield update


def _bind_back(question: Any, result: str) -> None:
    """Make the `b` key end this prompt with `result` (the Back signal)."""
    from prompt_toolkit.key_binding import KeyBindings, merge_key_bindings

    extra = KeyBindings()

    @extra.add("b", eager=True)
    @extra.add("B", eager=True)
    def _back(event: Any) -> None:
        event.app.exit(result=result)

    app = question.application
    app.key_bindings = merge_key_bindings([app.key_bindings, extra]) if app.key_bindings else extra


def _back_after_error(question: Any) -> None:
    """Right after a rejected answer, `b` replaces the rejected text, so a lone `b` + Enter still goes back."""
    from prompt_toolkit.application.current import get_app
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.key_binding import KeyBindings, merge_key_bindings

    extra = KeyBindings()
    rejected = Condition(lambda: get_app().current_buffer.validation_error is not None)

    @extra.add("b", filter=rejected, eager=True)
    @extra.add("B", filter=rejected, eager=True)
    def _replace(event: Any) -> None:
        event.current_buffer.text = BACK_WORD
        event.current_buffer.cursor_position = len(BACK_WORD)

    app = question.application
    app.key_bindings = merge_key_bindings([app.key_bindings, extra]) if app.key_bindings else extra


def flush_typeahead(stream: Any = None) -> None:
    """Drop keys typed before a prompt was shown (termios.tcflush on a terminal; nothing otherwise)."""
    stream = sys.stdin if stream is None else stream
    try:
        fd = stream.fileno()
        if not os.isatty(fd):
            return
        import termios  # POSIX only; Windows consoles keep their type-ahead
    except (AttributeError, OSError, ValueError, ImportError):
        return
    with contextlib.suppress(OSError):
        termios.tcflush(fd, termios.TCIFLUSH)


def _enter_takes_default(question: Any, shown: str) -> None:
    """Enter on an empty line types the default first, so the finished prompt shows the value used."""
    from prompt_toolkit.key_binding import KeyBindings, merge_key_bindings

    extra = KeyBindings()

    @extra.add("enter", eager=True)
    def _accept(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.complete_state is None and not buffer.text.strip():
            buffer.text = shown
            buffer.cursor_position = len(shown)
        buffer.validate_and_handle()

    app = question.application
    app.key_bindings = merge_key_bindings([app.key_bindings, extra]) if app.key_bindings else extra


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()
