"""Generate in the wizard: model, optional adapter (and strength, comparison), one prompt, then the same
`generate` call as `sidestep generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidestep.generation import MAX_DURATION_S, PromptDefaults, make_prompt
from sidestep.wizard.asker import Asker
from sidestep.wizard.common import Answers, Session, ask_model, ask_optional_file
from sidestep.wizard.steps import Step, run_steps

__all__ = ["generate_flow", "build_generate_config"]


def generate_flow(asker: Asker, session: Session) -> None:
    answers = run_steps(asker, _steps(), {})
    if not answers["go"]:
        asker.say("Nothing was rendered; back to the main menu.")
        return
    _run(asker, build_generate_config(answers), answers)


def _steps() -> list[Step]:
    has_adapter = lambda ans: ans.get("adapter") is not None  # noqa: E731
    return [
        Step("model", lambda a, ans: ask_model(a, ans, question="Which model? (the one the adapter was trained on)")),
        Step("adapter", _ask_adapter),
        Step("strength", _ask_strength, when=has_adapter),
        Step("compare", lambda a, ans: a.confirm("Also render the base model with the same seed, to compare?",
                                                  default=ans.get("compare", False)), when=has_adapter),
        Step("prompt", lambda a, ans: a.text("Prompt (genre, instruments, mood)", default=ans.get("prompt", ""),
                                             validate=lambda v: None if v else "Type a prompt.")),
        Step("lyrics", lambda a, ans: a.text("Lyrics ([Verse]/[Chorus] tags)", default=ans.get("lyrics", "[Instrumental]"))),
        Step("duration", lambda a, ans: a.number("Duration in seconds", default=ans.get("duration", 30.0), lo=0.1,
                                                 hi=MAX_DURATION_S)),
        Step("seed", lambda a, ans: a.integer("Seed (the same seed gives the same audio)", default=ans.get("seed", 0),
                                              lo=0)),
        Step("out", lambda a, ans: a.folder("Output folder", default=ans.get("out", Path("generated")), must_exist=False)),
        Step("overwrite", _ask_overwrite, when=_outputs_exist),
        Step("go", lambda a, ans: a.confirm("Render now?", default=True)),
    ]


def build_generate_config(answers: Answers) -> Any:
    """The `GenerateConfig` of the answers (ConfigError like the CLI's)."""
    from sidestep.training.generate import GenerateConfig

    defaults = PromptDefaults(duration=float(answers["duration"]), seed=int(answers["seed"]), lyrics=answers["lyrics"])
    prompt = make_prompt("prompt", {"prompt": answers["prompt"]}, defaults)
    return GenerateConfig((prompt,), answers["out"], adapter=answers.get("adapter"),
                          strength=float(answers.get("strength", 1.0)) if answers.get("adapter") else 1.0,
                          compare=bool(answers.get("compare")), overwrite=bool(answers.get("overwrite")))


def _ask_adapter(asker: Asker, answers: Answers) -> Path | None:
    from sidestep.training.generate import read_saved_adapter

    layers = int(answers["model"].entry.config["num_hidden_layers"])
    return ask_optional_file(asker, "Adapter: a training output, an adapter folder or an exported .safetensors "
                             "(empty = base model)", answers.get("adapter"),
                             lambda path: read_saved_adapter(path, layers))


def _ask_strength(asker: Asker, answers: Answers) -> float:
    from sidestep.training.generate import MAX_STRENGTH

    return asker.number("Adapter strength (0 = base model, 1 = as trained)", default=answers.get("strength", 1.0),
                        lo=0.0, hi=MAX_STRENGTH)


def _outputs_exist(answers: Answers) -> bool:
    answers["overwrite"] = False
    config = build_generate_config(answers)
    prompt = config.prompts[0]
    return any(p.exists() for p in (*config.files(prompt).values(), config.settings_file(prompt)))


def _ask_overwrite(asker: Asker, answers: Answers) -> bool:
    from sidestep.wizard.asker import Back

    if not asker.confirm(f"{answers['out']} already holds a render of this prompt; replace it?", default=False):
        raise Back()
    return True


def _run(asker: Asker, config: Any, answers: Answers) -> Any:
    """The same library call as `sidestep generate`."""
    from sidestep.models.select import choose_runtime
    from sidestep.training.generate import generate

    runtime = choose_runtime(None, None, False)
    asker.say(f"[dim]Runtime: {runtime.reason}[/]")
    asker.say("[dim]Loading the model, the VAE and the text encoder…[/]")
    outcome = generate(config, answers["model"], runtime,
                       lambda event: asker.say(f"Rendering {event.name} ({event.label})"))
    for clip in outcome.clips:
        for label, path in clip.files.items():
            asker.say(f"[green]✓ {label}: {path}[/]")
    return outcome
