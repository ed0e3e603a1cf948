"""Export in the wizard: trained adapter → format → destination folder → the same `export_adapter` as the CLI.

Reached from the main menu, and offered right after training with that run's output folder filled in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from sidestep.errors import SidestepError
from sidestep.wizard.asker import Asker, Back, Option
from sidestep.wizard.common import Answers, Session
from sidestep.wizard.fields import problem_of
from sidestep.wizard.steps import Step, run_steps

__all__ = ["export_flow", "FORMAT_OPTIONS"]

FORMAT_OPTIONS = [
    Option("comfyui", "comfyui", "one .safetensors for ComfyUI's models/loras/, named after the run"),
    Option("diffusers", "diffusers", "pytorch_lora_weights.safetensors for pipe.load_lora_weights(folder)"),
    Option("peft", "peft", "ACE-Step's own adapter folder (any adapter kind)"),
]


def export_flow(asker: Asker, session: Session, start: Mapping[str, Any] | None = None) -> Path | None:
    """Ask, export, say where it went; returns the written path (None when nothing was written)."""
    answers: dict[str, Any] = dict(start or {})
    if "src" not in answers and session.last_output is not None:
        answers["src"] = session.last_output
    run_steps(asker, _steps(), answers)
    if not answers["go"]:
        asker.say("Nothing was written.")
        return None
    from sidestep.training.export import export_adapter

    try:
        result = export_adapter(answers["src"], answers["dest"], answers["format"], overwrite=True)
    except SidestepError as err:  # e.g. a DoRA adapter to ComfyUI: say why, write nothing, stay in the wizard
        asker.say(f"[bold red]Error:[/] {err}")
        return None
    session.last_export_dir = Path(answers["dest"])
    asker.say(f"[green]✓ Exported {result.modules} adapted modules as {result.format.value}: {result.path}[/]")
    return result.path


def _steps() -> list[Step]:
    return [
        Step("src", _ask_source),
        Step("format", _ask_format),
        Step("dest", _ask_dest),
        Step("go", _confirm),
    ]


def _ask_source(asker: Asker, answers: Answers) -> Path:
    from sidestep.training.export import adapter_source

    def check(folder: Path) -> str | None:
        return problem_of(lambda: adapter_source(folder))

    return asker.folder("Trained adapter (a training output folder or an adapter folder)", default=answers.get("src"),
                        validate=check)


def _ask_format(asker: Asker, answers: Answers) -> str:
    return asker.choice("Export for which loader?", FORMAT_OPTIONS, default=answers.get("format", "comfyui"))


def _ask_dest(asker: Asker, answers: Answers) -> Path:
    src = Path(answers["src"])
    default = answers.get("dest") or (src / "exported" if (src / "final").is_dir() else src.parent / "exported")
    label = "Destination folder (e.g. ComfyUI/models/loras)" if answers["format"] == "comfyui" else "Destination folder"
    return asker.folder(label, default=default, must_exist=False)


def _confirm(asker: Asker, answers: Answers) -> bool:
    from sidestep.training.export import export_target

    target = export_target(answers["src"], answers["dest"], answers["format"])
    if not target.exists():
        return True
    if asker.confirm(f"{target} already exists. Replace it?", default=False):
        return True
    raise Back()  # choose another destination
