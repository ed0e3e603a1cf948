"""Train in the wizard: basic (a few questions) or advanced (every TrainConfig field), then the same `train` call.

Shows whether the dataset has a Preprocessing++ map and lets the user ignore it (`ignore_fisher_map`); when the
analysis also left init bases (fisher_init.safetensors), offers `--init gradient` for LoRA/DoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rich.table import Table

from sidestep.analysis.fisher_map import ADVISED_LR, MAP_FILENAME, TURBO_MAP_ADVICE, read_map
from sidestep.analysis.init_file import INIT_FILENAME
from sidestep.errors import SidestepError
from sidestep.training.config import AdapterKind, TrainConfig
from sidestep.wizard.asker import Asker, Back, Option
from sidestep.wizard.common import Answers, Session, ask_dataset, ask_model, ask_optional_file, ask_preset
from sidestep.wizard.fields import ask_field, problem_of
from sidestep.wizard.presets import PRESET_FIELDS
from sidestep.wizard.presets_flow import offer_save_preset
from sidestep.wizard.steps import Step, default_of, run_steps

__all__ = ["train_flow", "build_train_config", "BASIC_FIELDS", "ADVANCED_FIELDS", "map_summary"]

# Fields the map decides when it is used; asked only for flat training.
MAP_DECIDES = ("rank", "alpha", "target_modules")
BASIC_FIELDS = ("rank", "lr", "epochs")
ADVANCED_FIELDS = (
    "rank", "alpha", "target_modules", "adapter", "dropout", "lr", "optimizer", "weight_decay", "scheduler",
    "warmup_steps", "epochs", "max_steps", "batch_size", "grad_accum", "max_grad_norm", "max_latent_length",
    "cfg_dropout", "timestep_mode", "save_every", "seed", "spike_factor",
)
_CONFIG_FIELDS = set(ADVANCED_FIELDS) | {"dataset_dir", "output_dir", "ignore_fisher_map", "resume", "overwrite",
                                         "init", "sample_every", "sample_prompts"}
_PRESET_TRAIN_FIELDS = [name for name in PRESET_FIELDS if name in _CONFIG_FIELDS or name == "gradient_checkpointing"]
_BOUNDS: Mapping[str, dict[str, Any]] = {"rank": {"lo": 1, "hi": 4096}, "epochs": {"lo": 1},
                                         "batch_size": {"lo": 1}, "grad_accum": {"lo": 1}}


def train_flow(asker: Asker, session: Session, start: Mapping[str, Any] | None = None) -> None:
    """Ask, confirm, train. `start` pre-fills answers (Preprocessing++ hands over its model and dataset)."""
    answers: dict[str, Any] = dict(start or {})
    if "carried_preset" in answers:  # handed over by Preprocessing++: its preset and model are not asked again
        _apply_carried_preset(asker, answers)
    run_steps(asker, _steps(), answers)
    if not answers["go"]:
        asker.say("Nothing was started; back to the main menu.")
        return
    config = build_train_config(answers)
    session.last_choices = _preset_values(config, answers)
    session.last_flow = "Train"
    _run(asker, config, answers)
    session.last_output = config.output_dir
    offer_save_preset(asker, session.last_choices)
    if asker.confirm("Export the adapter for ComfyUI, diffusers or peft now?", default=True):
        from sidestep.wizard.export_flow import export_flow

        export_flow(asker, session, start={"src": config.output_dir})


def _apply_carried_preset(asker: Asker, answers: Answers) -> None:
    from sidestep.wizard.presets import load_preset, overlapping

    name = answers["carried_preset"]
    answers["preset"] = name
    answers["preset_values"] = overlapping(load_preset(name), _PRESET_TRAIN_FIELDS) if name else {}
    model = answers["model"].entry.label
    asker.say(f"[dim]From Preprocessing++: model {model}"
              + (f", preset {name}" if name else "") + " (start Train from the menu to change them).[/]")


def _steps() -> list[Step]:
    steps = [
        Step("preset", lambda a, ans: ask_preset(a, ans, _PRESET_TRAIN_FIELDS), when=_not_carried),
        Step("mode", _ask_mode),
        Step("model", ask_model, when=_not_carried),
        Step("dataset_dir", ask_dataset),
        Step("use_map", _ask_use_map, when=lambda ans: _map_path(ans).is_file()),
        Step("output_dir", _ask_output_dir),
        Step("existing", _ask_existing, when=lambda ans: _holds_adapter(ans.get("output_dir"))),
    ]
    for name in ADVANCED_FIELDS:
        steps.append(Step(name, _field_question(name), when=_asked_when(name)))
    steps.append(Step("sample_every", _ask_sample_every))
    steps.append(Step("sample_prompts", _ask_sample_prompts, when=lambda ans: bool(ans.get("sample_every"))))
    steps.append(Step("init", _ask_init, when=_offers_init))
    steps.append(Step("gradient_checkpointing", _ask_gc, when=lambda ans: ans.get("mode") == "advanced"))
    steps.append(Step("go", _confirm))
    return steps


def _not_carried(answers: Answers) -> bool:
    return "carried_preset" not in answers


def _asked_when(name: str):
    def when(answers: Answers) -> bool:
        if name in MAP_DECIDES and _uses_map(answers):
            return False
        return name in (ADVANCED_FIELDS if answers.get("mode") == "advanced" else BASIC_FIELDS)

    return when


def build_train_config(answers: Answers) -> TrainConfig:
    """Dataclass defaults ← preset values ← answers, as a `TrainConfig` (ConfigError like the CLI's)."""
    values = {k: v for k, v in answers.get("preset_values", {}).items() if k in _CONFIG_FIELDS}
    values.update({k: v for k, v in answers.items() if k in _CONFIG_FIELDS})
    values["ignore_fisher_map"] = _map_path(answers).is_file() and not answers.get("use_map", True)
    if _holds_adapter(answers.get("output_dir")) and answers.get("existing"):
        values["resume" if answers["existing"] == "resume" else "overwrite"] = (
            "latest" if answers["existing"] == "resume" else True)
    values.setdefault("output_dir", answers.get("output_dir") or Path(answers["dataset_dir"]).parent / "output")
    return TrainConfig(**values)


# ---- questions -------------------------------------------------------------------------------------------------


def _ask_mode(asker: Asker, answers: Answers) -> str:
    options = [Option("basic", "basic", "a few questions, good defaults"),
               Option("advanced", "advanced", "every training setting")]
    return asker.choice("How much do you want to set?", options, default=answers.get("mode", "basic"))


def _map_path(answers: Answers) -> Path:
    folder = answers.get("dataset_dir")
    return Path(folder) / MAP_FILENAME if folder else Path("/nonexistent") / MAP_FILENAME


def _uses_map(answers: Answers) -> bool:
    return _map_path(answers).is_file() and bool(answers.get("use_map", True))


def _ask_use_map(asker: Asker, answers: Answers) -> bool:
    path = _map_path(answers)
    try:
        asker.say(map_summary(path))
    except SidestepError as err:
        asker.say(f"[yellow]{err}[/]")
    options = [Option("Use it", True, "Adaptive Rank: only the mapped modules, each with its own rank"),
               Option("Ignore it", False, "flat rank on every target module (--ignore-fisher-map)")]
    return asker.choice("Preprocessing++ map detected. Use it?", options, default=answers.get("use_map", True))


def map_summary(path: Path) -> str:
    fmap = read_map(path)
    ranks = sorted(fmap.rank_pattern.values())
    per_cat: dict[str, int] = {}
    for module in fmap.modules:
        per_cat[module.category] = per_cat.get(module.category, 0) + 1
    cats = ", ".join(f"{n} {c}" for c, n in sorted(per_cat.items())) or f"{len(ranks)} modules"
    line = (f"[bold]Preprocessing++ map detected[/] ({path}): {len(ranks)} modules adapted ({cats}), "
            f"ranks {ranks[0]}–{ranks[-1]}, focus {fmap.timestep_focus}" if ranks else f"Map {path} adapts no module")
    if fmap.trainable_params and fmap.flat_equivalent_params:
        line += f"; {fmap.trainable_params:,} trainable parameters vs {fmap.flat_equivalent_params:,} flat"
    return line + f". Advice: a lower learning rate (e.g. {ADVISED_LR}) and early listening, as it adapts strongly."


def _offers_init(answers: Answers) -> bool:
    """Init bases beside the data, and an adapter whose A matrix they can set (LoRA or DoRA)."""
    folder = answers.get("dataset_dir")
    adapter = answers.get("adapter", answers.get("preset_values", {}).get("adapter", "lora"))
    kind = AdapterKind(getattr(adapter, "value", adapter))
    return bool(folder) and (Path(folder) / INIT_FILENAME).is_file() and kind in (AdapterKind.LORA, AdapterKind.DORA)


def _ask_init(asker: Asker, answers: Answers) -> str:
    options = [Option("Default", "default", "peft's random A (B = 0)"),
               Option("Gradient-aligned", "gradient", "A starts from the top gradient directions Preprocessing++ "
                                                      "found (B = 0, output unchanged at step 0)")]
    return asker.choice(f"Adapter init ({INIT_FILENAME} found)", options, default=answers.get("init", "default"))


def _ask_output_dir(asker: Asker, answers: Answers) -> Path:
    dataset = Path(answers["dataset_dir"])
    default = answers.get("output_dir") or dataset.parent / f"{dataset.name}-lora"
    return asker.folder("Output folder for the adapter", default=default, must_exist=False)


def _holds_adapter(folder: Path | None) -> bool:
    from sidestep.training import saving

    if folder is None:
        return False
    ckpts = Path(folder) / "checkpoints"
    return saving.final_dir(Path(folder)).exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


def _ask_existing(asker: Asker, answers: Answers) -> str:
    options = [Option("Continue it", "resume", "resume from its latest checkpoint"),
               Option("Start over", "overwrite", "the old adapter is kept as .bak"),
               Option("Choose another folder", "another")]
    picked = asker.choice(f"{answers['output_dir']} already holds a trained adapter.", options,
                          default=answers.get("existing", "resume"))
    if picked == "another":
        raise Back()
    return picked


def _field_question(name: str):
    def ask(asker: Asker, answers: Answers) -> Any:
        preset = answers.get("preset_values", {})
        default = answers.get(name, preset.get(name, default_of(TrainConfig, name)))
        if name == "lr" and _uses_map(answers) and name not in answers and name not in preset:
            asker.say(f"[dim]With a map, a lower learning rate (e.g. {ADVISED_LR}) is advised.[/]")

        def check(value: Any) -> str | None:
            return problem_of(lambda: build_train_config({**answers, name: value}))

        if name == "timestep_mode":
            options = [Option("auto", None, "the model's default: discrete for turbo, continuous otherwise"),
                       Option("continuous", "continuous", "logit-normal t, the base/sft training distribution"),
                       Option("discrete", "discrete", "the turbo 8-step schedule")]
            return asker.choice("Timestep sampling", options, default=default)
        return ask_field(asker, TrainConfig, name, default, check, **_BOUNDS.get(name, {}))

    return ask


def _ask_sample_every(asker: Asker, answers: Answers) -> int:
    return asker.integer("Listen while training: render audio samples every N steps (0 = no samples)",
                         default=answers.get("sample_every", 0), lo=0)


def _ask_sample_prompts(asker: Asker, answers: Answers) -> Path | None:
    from sidestep.generation import read_prompts

    return ask_optional_file(asker, "Sample prompts file (TOML or JSON; empty = a caption from the dataset)",
                             answers.get("sample_prompts"), read_prompts)


def _ask_gc(asker: Asker, answers: Answers) -> bool:
    default = _gradient_checkpointing(answers)
    if default is None:  # auto, as the CLI resolves it: on for GPUs, off on the CPU
        from sidestep.models.select import choose_runtime

        default = choose_runtime(None, None).gradient_checkpointing
    return asker.confirm("Gradient checkpointing (less memory, about 30% slower)?", default=default)


def _confirm(asker: Asker, answers: Answers) -> bool:
    config = build_train_config(answers)
    asker.say(_summary(config, answers))
    if _uses_map(answers) and answers["model"].entry.is_turbo:
        asker.say(f"[yellow]{TURBO_MAP_ADVICE}[/]")
    return asker.confirm("Start training?", default=True)


def _summary(config: TrainConfig, answers: Answers) -> Table:
    table = Table(title="Training — about to start", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("Model", answers["model"].entry.label)
    table.add_row("Dataset", f"{config.dataset_dir} ({len(answers['scan'].files)} samples)")
    if _uses_map(answers):
        table.add_row("Adapters", f"Adaptive Rank from {MAP_FILENAME}")
    else:
        table.add_row("Adapters", f"{config.adapter.value}, rank {config.rank}, alpha {config.alpha:g}, "
                                  f"targets {', '.join(config.target_modules)}")
    if config.init.value != "default":
        table.add_row("Init", f"{config.init.value} (from {INIT_FILENAME})")
    lr = "auto" if config.lr is None else f"{config.lr:g}"  # auto: resolved by the run (map, optimizer)
    table.add_row("Learning rate", f"{lr} ({config.optimizer.value}, {config.scheduler.value})")
    length = config.max_steps and f", at most {config.max_steps} steps" or ""
    table.add_row("Length", f"{config.epochs} epochs{length}")
    table.add_row("Batch", f"{config.batch_size} × {config.grad_accum} accumulation")
    table.add_row("Output", str(config.output_dir))
    if config.sample_every:
        prompts = config.sample_prompts or "a caption from the dataset"
        table.add_row("Samples", f"every {config.sample_every} steps, from {prompts}, in {config.output_dir / 'samples'}")
    return table


def _preset_values(config: TrainConfig, answers: Answers) -> dict[str, Any]:
    values = {name: getattr(config, name) for name in _PRESET_TRAIN_FIELDS if hasattr(config, name)}
    if "gradient_checkpointing" in answers:
        values["gradient_checkpointing"] = answers["gradient_checkpointing"]
    if _uses_map(answers):
        for name in MAP_DECIDES:
            values.pop(name, None)
    if values.get("alpha") == 2 * config.rank:  # the derived default; a preset keeps only a chosen alpha
        values.pop("alpha")
    return {k: v for k, v in values.items() if v is not None}


def _run(asker: Asker, config: TrainConfig, answers: Answers) -> Any:
    """The same library call and display as `sidestep train`."""
    from sidestep.display.training import TrainDisplay  # the progress display `sidestep train` uses
    from sidestep.models.select import choose_runtime
    from sidestep.training.run import train

    runtime = choose_runtime(None, None, _gradient_checkpointing(answers))
    asker.say(f"[dim]Runtime: {runtime.reason}. Loading the model…[/]")
    with TrainDisplay(config.output_dir) as display:
        outcome = train(config, answers["model"], runtime, display.on_event)
    ema = "n/a" if outcome.loss_ema is None else f"{outcome.loss_ema:.4f}"
    asker.say(f"[green]✓ Trained {outcome.steps} steps (loss EMA {ema}); adapter in {outcome.final_dir}[/]")
    asker.say(f"[dim]Export it for other loaders with `sidestep export --format comfyui {outcome.final_dir} DEST`.[/]")
    return outcome


def _gradient_checkpointing(answers: Answers) -> bool | None:
    """The advanced answer, else the preset's value, else None (auto: on for GPUs)."""
    if "gradient_checkpointing" in answers:
        return answers["gradient_checkpointing"]
    return answers.get("preset_values", {}).get("gradient_checkpointing")
