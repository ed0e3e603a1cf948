"""Wizard unit tests: scripted answers through `ScriptedAsker`, no terminal involved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidestep import settings
from sidestep.errors import ConfigError
from sidestep.wizard import presets
from sidestep.wizard.asker import CANCEL, Back, Option, ScriptedAsker, parse_float, parse_int
from sidestep.wizard.menu import run_wizard
from sidestep.wizard.settings_flow import first_run_setup, settings_flow
from sidestep.wizard.steps import Step, run_steps


def _int_step(key: str, default: int):
    return Step(key, lambda ask, ans: ask.integer(key, default=ans.get(key, default), lo=0, hi=100))


# ---- the step engine -------------------------------------------------------------------------------------------


def test_back_returns_to_previous_question_with_previous_answer_as_default():
    asker = ScriptedAsker(["1", "2", "b", "", "3"])
    answers = run_steps(asker, [_int_step("a", 10), _int_step("b", 20), _int_step("c", 30)])
    assert answers == {"a": 1, "b": 2, "c": 3}
    assert [(q.message, q.default) for q in asker.asked] == [("a", 10), ("b", 20), ("c", 30), ("b", 2), ("c", 30)]


def test_back_twice_walks_back_two_questions():
    asker = ScriptedAsker(["1", "2", "b", "b", "", "", "5"])
    answers = run_steps(asker, [_int_step("a", 10), _int_step("b", 20), _int_step("c", 30)])
    assert [q.default for q in asker.asked] == [10, 20, 30, 2, 1, 2, 30]
    assert answers == {"a": 1, "b": 2, "c": 5}


def test_back_at_first_question_leaves_the_flow():
    with pytest.raises(Back):
        run_steps(ScriptedAsker(["b"]), [_int_step("a", 10)])


def test_skipped_steps_are_skipped_going_back_too():
    steps = [_int_step("a", 1), Step("b", lambda ask, ans: ask.integer("b"), when=lambda ans: ans["a"] > 5),
             _int_step("c", 3)]
    asker = ScriptedAsker(["2", "b", "", ""])
    assert run_steps(asker, steps) == {"a": 2, "c": 3}
    assert [q.message for q in asker.asked] == ["a", "c", "a", "c"]


# ---- the asker ------------------------------------------------------------------------------------------------


def test_bad_typed_answers_are_rejected_with_a_reason_and_asked_again():
    asker = ScriptedAsker(["x", "500", "7"])
    assert asker.integer("n", default=1, lo=1, hi=256) == 7
    assert asker.errors == ["'x' is not a whole number.", "500 is outside 1..256."]


def test_parsers():
    assert parse_float("1e-4") == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        parse_float("nan")
    with pytest.raises(ValueError):
        parse_int("3.5")


def test_choice_matches_label_value_or_unique_substring():
    opts = [Option("alpha one", 1), Option("beta two", 2)]
    assert ScriptedAsker(["beta two"]).choice("q", opts) == 2
    assert ScriptedAsker(["1"]).choice("q", opts) == 1
    assert ScriptedAsker(["two"]).choice("q", opts) == 2
    assert ScriptedAsker([""]).choice("q", opts, default=2) == 2


def test_folder_validated_on_entry(tmp_path):
    asker = ScriptedAsker([str(tmp_path / "missing"), str(tmp_path)])
    assert asker.folder("where") == tmp_path.resolve()
    assert "does not exist" in asker.errors[0]


# ---- presets ----------------------------------------------------------------------------------------------------


def test_builtin_presets_load_and_hold_only_known_fields():
    names = {p.name for p in presets.builtin_presets()}
    assert {"quick-test", "recommended", "high-quality", "low-vram-8gb", "low-vram-12gb", "low-vram-16gb",
            "low-vram-24gb"} <= names
    for preset in presets.builtin_presets():
        assert set(preset.values) <= set(presets.PRESET_FIELDS)
        assert preset.values["rank_min"] <= preset.values["rank"] <= preset.values["rank_max"]


def test_user_preset_save_load_delete_and_builtins_protected():
    saved = presets.save_preset("Mine", {"rank": 32, "lr": 5e-5, "not_a_field": 1}, "test")
    assert saved.name == "mine" and saved.path == settings.config_dir() / "presets" / "mine.json"
    assert json.loads(saved.path.read_text())["values"] == {"rank": 32, "lr": 5e-5}
    assert presets.load_preset("mine").values == {"rank": 32, "lr": 5e-5}
    with pytest.raises(ConfigError, match="built-in"):
        presets.save_preset("recommended", {"rank": 8})
    with pytest.raises(ConfigError, match="built-in"):
        presets.delete_preset("recommended")
    with pytest.raises(ConfigError, match="not valid"):
        presets.save_preset("../evil", {"rank": 8})
    presets.delete_preset("mine")
    assert not saved.path.exists()


def test_overlapping_applies_only_shared_fields():
    preset = presets.load_preset("recommended")
    assert presets.overlapping(preset, ["rank", "rank_min", "rank_max", "focus"]) == {
        "rank": 64, "rank_min": 16, "rank_max": 128}


def test_corrupt_user_preset_is_one_sentence(tmp_path):
    folder = presets.user_presets_dir()
    folder.mkdir(parents=True)
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        presets.list_presets()


# ---- settings and the menu -----------------------------------------------------------------------------------


def test_first_run_settings_persisted(checkpoint_root):
    asker = ScriptedAsker([str(checkpoint_root), "acestep-v15-base"])
    first_run_setup(asker)
    stored = settings.load_settings()
    assert stored.first_run_done is True
    assert stored.checkpoint_dir == Path(checkpoint_root).resolve()
    assert stored.model == "base"


def test_first_run_rejects_a_folder_without_models_then_goes_back(tmp_path, checkpoint_root):
    asker = ScriptedAsker([str(tmp_path), str(checkpoint_root), "b", "", "acestep-v15-base-diffusers"])
    first_run_setup(asker)
    assert "No ACE-Step model folder" in asker.errors[0]
    assert asker.asked[3].default == Path(checkpoint_root).resolve()  # back: previous answer is the default
    assert settings.load_settings().model == "acestep-v15-base-diffusers"


def test_menu_runs_first_run_then_quits(checkpoint_root):
    asker = ScriptedAsker([str(checkpoint_root), "", "Quit"])
    run_wizard(asker)
    assert settings.load_settings().first_run_done
    assert asker.said[-1] == "Bye."


def test_ctrl_c_in_a_flow_returns_to_menu_and_at_menu_quits(checkpoint_root):
    settings.save_settings(settings.Settings(checkpoint_dir=Path(checkpoint_root), first_run_done=True))
    asker = ScriptedAsker(["Settings", CANCEL, CANCEL])
    run_wizard(asker)
    assert [q.message for q in asker.asked] == [
        "What do you want to do?", "Settings: which one do you want to change?", "What do you want to do?"]


def test_settings_edit_device(checkpoint_root):
    settings.save_settings(settings.Settings(checkpoint_dir=Path(checkpoint_root), first_run_done=True))
    settings_flow(ScriptedAsker(["device", "cpu", "Done"]))
    assert settings.load_settings().device == "cpu"


# ---- Preprocessing++ flow (questions; the run is replaced by a recorder) ------------------------------------------

from sidestep.testing.tiny import write_original_checkpoint  # noqa: E402
from sidestep.wizard import analysis_flow as af  # noqa: E402
from sidestep.wizard.common import Session  # noqa: E402


@pytest.fixture
def configured(checkpoint_root):
    settings.save_settings(settings.Settings(checkpoint_dir=Path(checkpoint_root), first_run_done=True))
    return checkpoint_root


@pytest.fixture
def recorded_runs(monkeypatch):
    runs = []
    monkeypatch.setattr(af, "_run", lambda asker, config, answers: runs.append(config))
    return runs


ANALYSIS_ANSWERS = ["", "acestep-v15-base", None, "texture", "", "16", "8", "32", "y", "n"]  # None: the dataset


def _analysis_script(dataset_dir):
    return [str(dataset_dir) if a is None else a for a in ANALYSIS_ANSWERS]


def test_analysis_flow_builds_the_cli_config(configured, dataset_dir, recorded_runs):
    asker = ScriptedAsker(_analysis_script(dataset_dir))
    af.analysis_flow(asker, Session())
    [config] = recorded_runs
    assert (config.dataset_dir, config.focus_label, config.base_rank, config.rank_min, config.rank_max) == (
        dataset_dir.resolve(), "texture", 16, 8, 32)
    assert "Estimated time" in asker.said_text() and "6 samples" in asker.said_text()


@pytest.mark.parametrize("step", range(1, 9))
def test_analysis_go_back_at_each_step(configured, dataset_dir, recorded_runs, step):
    script = _analysis_script(dataset_dir)
    asker = ScriptedAsker(script[:step] + ["b"] + script[step - 1:])
    af.analysis_flow(asker, Session())
    previous, again = asker.asked[step - 1], asker.asked[step + 1]
    assert again.message == previous.message
    expected = {1: "", 2: "acestep-v15-base", 3: dataset_dir.resolve(), 4: "texture", 5: "median", 6: 16, 7: 8,
                8: 32}[step]
    assert again.default == expected
    assert len(recorded_runs) == 1


def test_analysis_flat_budget_is_asked_and_shown(configured, dataset_dir, recorded_runs):
    script = _analysis_script(dataset_dir)
    script[4:8] = ["flat", "64", "16", ""]  # the largest rank offered: 4 × the base rank under the flat budget
    asker = ScriptedAsker(script)
    af.analysis_flow(asker, Session())
    assert recorded_runs[0].budget is af.BudgetMode.FLAT and recorded_runs[0].rank_max == 256
    assert "flat: the parameters of a rank-64 LoRA on every target" in asker.said_text()
    assert af.build_config(dict(dataset_dir=dataset_dir)).budget is af.BudgetMode.MEDIAN  # the CLI's default


def test_analysis_bad_rank_budget_is_rejected_by_the_config(configured, dataset_dir, recorded_runs):
    script = _analysis_script(dataset_dir)
    script[6:8] = ["32", "8", "4", "24"]  # rank_min 32 > base 16, then 8; max 4 < base 16, then 24
    af.analysis_flow(asker := ScriptedAsker(script), Session())
    assert recorded_runs[0].rank_min == 8 and recorded_runs[0].rank_max == 24
    assert asker.errors == ["32 is outside 1..16.", "4 is outside 16..4096."]


def test_custom_focus_is_parsed_and_back_returns_to_focus(configured, dataset_dir, recorded_runs):
    script = _analysis_script(dataset_dir)
    script[3:4] = ["custom", "0.9,0.1", "b", "custom", "0.2,0.7"]
    asker = ScriptedAsker(script)
    af.analysis_flow(asker, Session())
    assert recorded_runs[0].focus_label == "0.2,0.7"
    assert any("need 0 <= LOW < HIGH" in e for e in asker.errors)


def test_preset_defaults_apply_only_to_overlapping_fields(configured, dataset_dir, recorded_runs):
    presets.save_preset("mine", {"rank": 24, "rank_min": 8, "rank_max": 48, "lr": 5e-5, "epochs": 3})
    script = _analysis_script(dataset_dir)
    script[0] = "mine"
    script[5:8] = ["", "", ""]
    asker = ScriptedAsker(script)
    af.analysis_flow(asker, Session())
    config = recorded_runs[0]
    assert (config.base_rank, config.rank_min, config.rank_max) == (24, 8, 48)
    defaults = {q.message.split(" (")[0]: q.default for q in asker.asked}
    assert defaults["Timestep focus"] == "balanced"  # not in the preset: the config's own default
    untouched = af.AnalysisConfig(dataset_dir=dataset_dir, base_rank=24, rank_min=8, rank_max=48,
                                  timestep_focus="texture")
    assert config == untouched  # lr/epochs (train fields) changed nothing here


def test_turbo_opt_in_refused_writes_nothing(tmp_path, tiny_cfg, dataset_dir, recorded_runs):
    root = tmp_path / "ckpt"
    write_original_checkpoint(root, {**tiny_cfg, "is_turbo": True}, seed=0, folder="acestep-v15-turbo")
    settings.save_settings(settings.Settings(checkpoint_dir=root, model="turbo", first_run_done=True))
    script = _analysis_script(dataset_dir)
    script[1] = "acestep-v15-turbo"
    script[8:] = ["n"]  # refuse the turbo opt-in
    asker = ScriptedAsker(script)
    af.analysis_flow(asker, Session())
    assert recorded_runs == [] and not (dataset_dir / "fisher_map.json").exists()
    assert "is a turbo model" in asker.said_text() and "lower learning rate" in asker.said_text()
    assert "Nothing was written" in asker.said_text()


@pytest.mark.slow
def test_analysis_flow_really_writes_a_map(configured, dataset_dir, monkeypatch, capsys):
    """The real library call on the tiny model: preview, save, result summary; declining to train."""
    monkeypatch.setenv("SIDESTEP_DEVICE", "cpu")
    script = _analysis_script(dataset_dir)
    script[5:8] = ["8", "4", "16"]
    script[9:] = ["y", "n"]  # run, save, do not train now
    for extra in sorted(dataset_dir.glob("*.pt"))[2:]:  # 2 samples: 2 runs x 2 batches keeps it quick
        extra.unlink()
    asker = ScriptedAsker(script)
    af.analysis_flow(asker, Session())
    fmap = json.loads((dataset_dir / "fisher_map.json").read_text())
    assert sorted(set(fmap["rank_pattern"].values()))[0] >= 4 and max(fmap["rank_pattern"].values()) <= 16
    text = asker.said_text()
    assert "Saved" in text and asker.progress_updates
    assert "Rank histogram" in capsys.readouterr().err  # the preview `sidestep analyze` shows
    assert not asker.answers


# ---- Train flow ---------------------------------------------------------------------------------------------------

from sidestep.analysis.fisher_map import FisherMap, write_map  # noqa: E402
from sidestep.wizard import train_flow as tf  # noqa: E402


@pytest.fixture
def recorded_trains(monkeypatch):
    runs = []
    monkeypatch.setattr(tf, "_run", lambda asker, config, answers: runs.append(config))
    return runs


def _write_map(folder: Path) -> None:
    write_map(FisherMap(rank_pattern={"layers.0.self_attn.q_proj": 8}, alpha_pattern={"layers.0.self_attn.q_proj": 16}),
              folder / "fisher_map.json")


@pytest.mark.parametrize("use_map", ["Use it", "Ignore it"])
def test_train_flow_shows_the_map_and_lets_the_user_ignore_it(configured, dataset_dir, tmp_path, recorded_trains,
                                                              use_map):
    _write_map(dataset_dir)
    rank = [] if use_map == "Use it" else ["16"]  # with the map, the map decides ranks: no rank question
    script = ["", "basic", "", str(dataset_dir), use_map, str(tmp_path / "out"), *rank, "", "2", "", "y", "n", "n"]
    asker = ScriptedAsker(script)
    tf.train_flow(asker, Session())
    [config] = recorded_trains
    assert config.ignore_fisher_map is (use_map == "Ignore it")
    assert config.epochs == 2 and config.output_dir == (tmp_path / "out").resolve()
    assert "map detected" in asker.said_text()
    assert config.rank == (16 if rank else 64)


def test_train_preset_applies_only_overlapping_fields(configured, dataset_dir, tmp_path, recorded_trains):
    presets.save_preset("mine", {"rank": 24, "rank_min": 8, "rank_max": 48, "lr": 5e-5, "batch_size": 2})
    script = ["mine", "basic", "", str(dataset_dir), str(tmp_path / "out"), "", "", "", "", "y", "n", "n"]
    asker = ScriptedAsker(script)
    tf.train_flow(asker, Session())
    [config] = recorded_trains
    assert (config.rank, config.lr, config.batch_size) == (24, 5e-5, 2)  # asked with preset defaults, or applied
    assert config.epochs == tf.default_of(tf.TrainConfig, "epochs")  # not in the preset: the config's default
    assert [q.default for q in asker.asked if q.message.startswith("Rank")] == [24]


def test_train_advanced_asks_every_field_and_back_keeps_answers(configured, dataset_dir, tmp_path, recorded_trains):
    fields = list(tf.ADVANCED_FIELDS) + ["sample_every", "gradient_checkpointing"]
    answers = ["", "advanced", "", str(dataset_dir), str(tmp_path / "out")] + [""] * len(fields)
    answers[5] = "32"  # rank
    answers[6:6] = ["b", ""]  # back at alpha -> rank shows 32 as its default
    asker = ScriptedAsker(answers + ["y", "n", "n"])
    tf.train_flow(asker, Session())
    [config] = recorded_trains
    assert config.rank == 32 and config.alpha == 64.0
    ranks = [q.default for q in asker.asked if q.message.startswith("Rank")]
    assert ranks == [64, 32]


def test_train_flow_asks_for_samples_and_rejects_a_bad_prompts_file(configured, dataset_dir, tmp_path,
                                                                     recorded_trains):
    good, bad = tmp_path / "prompts.toml", tmp_path / "bad.json"
    good.write_text('[[prompts]]\nprompt = "warm pads"\nduration = 10\n', encoding="utf-8")
    bad.write_text("[]", encoding="utf-8")
    script = ["", "basic", "", str(dataset_dir), str(tmp_path / "out"), "", "", "", "25", str(bad), str(good), "y", "n", "n"]
    asker = ScriptedAsker(script)
    tf.train_flow(asker, Session())
    [config] = recorded_trains
    assert config.sample_every == 25 and config.sample_prompts == good
    assert any("prompt list is empty" in e for e in asker.errors)
    assert "every 25 steps, from" in "".join(_table_text(item) for item in asker.said)  # in the summary table


def _table_text(item) -> str:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(item)
    return console.export_text()


@pytest.mark.slow
def test_train_flow_really_trains(configured, dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SIDESTEP_DEVICE", "cpu")
    for extra in sorted(dataset_dir.glob("*.pt"))[2:]:
        extra.unlink()
    out = tmp_path / "out"
    asker = ScriptedAsker(["", "basic", "", str(dataset_dir), str(out), "8", "", "1", "", "y", "n", "n"])
    tf.train_flow(asker, Session())
    assert (out / "final").is_dir()
    assert "Trained 2 steps" in asker.said_text()
    # Same folder again: the wizard asks what to do with the existing adapter.
    asker = ScriptedAsker(["", "basic", "", str(dataset_dir), str(out), "Choose another", str(tmp_path / "o2"),
                           "8", "", "1", "", "n"])
    tf.train_flow(asker, Session())
    assert "Nothing was started" in asker.said_text()


# ---- Preprocess flow ------------------------------------------------------------------------------------------------

from sidestep.wizard import preprocess_flow as pf  # noqa: E402


def test_preprocess_flow_builds_the_cli_config(configured, tmp_path, monkeypatch):
    audio = tmp_path / "songs"
    audio.mkdir()
    (audio / "a.wav").write_bytes(b"RIFF")
    seen = []

    def fake_run(asker, config):
        seen.append(config)
        return None

    monkeypatch.setattr(pf, "_run", fake_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    asker = ScriptedAsker([str(empty), str(audio), "", str(tmp_path / "missing.json"), "b", "", "", "y"])
    pf.preprocess_flow(asker, Session())
    [config] = seen
    assert config.audio_dir == audio.resolve() and config.output_dir == (tmp_path / "songs-tensors").resolve()
    assert config.dataset_json is None and config.model == "acestep-v15-base"
    assert "holds no audio files" in asker.errors[0] and "missing.json does not exist" in asker.errors[1]


# ---- the real prompts, typed into through a pipe ------------------------------------------------------------------

from prompt_toolkit.input import create_pipe_input  # noqa: E402
from prompt_toolkit.output import DummyOutput  # noqa: E402

from sidestep.wizard.asker import Cancel, QuestionaryAsker  # noqa: E402


def _typed(keys: str, ask):
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        return ask(QuestionaryAsker(input=pipe, output=DummyOutput()))


@pytest.mark.parametrize("ask", [
    lambda a: a.confirm("ok?"),
    lambda a: a.integer("n", default=5),
    lambda a: a.folder("where", default="/tmp"),
    lambda a: a.choice("pick", ["x", "y"]),
], ids=["confirm", "integer", "folder", "short choice"])
def test_typing_b_goes_back_at_every_kind_of_prompt(ask):
    with pytest.raises(Back):
        _typed("b\r", ask)


def test_real_prompts_take_defaults_and_ctrl_c_cancels():
    assert _typed("\r", lambda a: a.integer("n", default=5, lo=1, hi=9)) == 5
    assert _typed("x\r\x7f7\r", lambda a: a.integer("n", default=5, lo=1, hi=9)) == 7  # "x" rejected; fixed
    assert _typed("y", lambda a: a.confirm("ok?")) is True
    with pytest.raises(Cancel):
        _typed("\x03", lambda a: a.text("name"))


def test_long_lists_filter_as_you_type():
    names = [f"model-{i}" for i in range(10)] + ["acestep-v15-turbo"]
    assert _typed("turbo\r", lambda a: a.choice("Which model?", names)) == "acestep-v15-turbo"
    assert _typed("\x1b[B\r", lambda a: a.choice("Which model?", names, default="model-3")) == "model-4"


def test_presets_menu_saves_last_choices_shows_and_deletes(configured):
    from sidestep.wizard.presets_flow import presets_flow

    session = Session(last_choices={"rank": 32, "rank_min": 8, "rank_max": 64}, last_flow="Preprocessing++")
    asker = ScriptedAsker(["Save the last", "recommended", "my-ranks", "mine", "Show presets",
                           "Delete", "my-ranks", "y", "Done"])
    presets_flow(asker, session)
    assert "built-in preset" in asker.errors[0]
    assert "my-ranks" in asker.said_text() and "low-vram-8gb" in asker.said_text()
    assert not (presets.user_presets_dir() / "my-ranks.json").exists()
    assert any("Saved" in str(x) or "saved" in str(x) for x in asker.said)


def test_choosing_a_preset_after_going_back_replaces_earlier_rank_answers(configured, dataset_dir, recorded_runs):
    script = _analysis_script(dataset_dir)
    # Answer up to the budget, go back to the very first question, pick a preset, take every default.
    script = script[:5] + ["b", "b", "b", "b", "b", "recommended", "", "", "", "", "", "", "", "y", "n"]
    af.analysis_flow(ScriptedAsker(script), Session())
    config = recorded_runs[0]
    assert (config.base_rank, config.rank_min, config.rank_max, config.focus_label) == (64, 16, 128, "texture")


# ---- issue 15: the chain between flows, Export, audio folders, setup, back after an error, type-ahead ---------------

from types import SimpleNamespace  # noqa: E402

from sidestep.wizard import common as wc  # noqa: E402
from sidestep.wizard.asker import flush_typeahead  # noqa: E402


def test_preprocessing_plus_plus_hands_its_preset_and_model_to_train(configured, dataset_dir, tmp_path, monkeypatch,
                                                                     recorded_trains):
    presets.save_preset("mine", {"rank": 24, "rank_min": 8, "rank_max": 48, "lr": 5e-5, "epochs": 3})
    monkeypatch.setattr(af, "_run", lambda asker, config, answers: SimpleNamespace(map=None))
    script = _analysis_script(dataset_dir)
    script[0] = "mine"
    script[5:8] = ["", "", ""]
    script[9:] = ["y",  # Train now with this map?
                  "basic", "", str(tmp_path / "out"), "", "", "", "", "y", "n", "n"]
    asker = ScriptedAsker(script)
    af.analysis_flow(asker, Session())
    [config] = recorded_trains
    messages = [q.message for q in asker.asked]
    after = messages[messages.index("Train now with this map?") + 1:]
    assert not any(m.startswith(("Load defaults", "Which model")) for m in after)  # carried, not asked again
    assert (config.lr, config.epochs, config.rank) == (5e-5, 3, 24)  # the preset's train fields apply
    said = " ".join(asker.said_text().split())
    assert "From Preprocessing++: model acestep-v15-base" in said and "preset mine" in said


def _saved_run(root: Path) -> Path:
    from test_train_export import _adaptive_plan, _trained
    from sidestep.training import saving

    plan = _adaptive_plan()
    saving.save_adapter_dir(root / "final", plan, _trained(plan))
    return root


def test_export_flow_writes_the_run_named_file_and_asks_before_replacing(configured, tmp_path):
    from sidestep.wizard.export_flow import export_flow

    run = _saved_run(tmp_path / "my-run")
    loras = tmp_path / "loras"
    session = Session(last_output=run)
    asker = ScriptedAsker(["", "comfyui", str(loras)])  # Enter: the last training output is the default source
    assert export_flow(asker, session) == loras / "my-run.safetensors"
    assert (loras / "my-run.safetensors").stat().st_mode & 0o777 == 0o644
    before = (loras / "my-run.safetensors").read_bytes()
    asker = ScriptedAsker(["", "comfyui", str(loras), "n", str(tmp_path / "elsewhere")])
    assert export_flow(asker, session) == tmp_path / "elsewhere" / "my-run.safetensors"
    assert (loras / "my-run.safetensors").read_bytes() == before  # refused: untouched
    assert any(q.message.endswith("already exists. Replace it?") for q in asker.asked)


def test_export_is_in_the_main_menu(configured, tmp_path):
    run = _saved_run(tmp_path / "menu-run")
    asker = ScriptedAsker(["Export", str(run), "peft", str(tmp_path / "peft-copy"), "Quit"])
    run_wizard(asker)
    assert (tmp_path / "peft-copy" / "adapter_config.json").is_file()


def test_an_audio_folder_given_as_dataset_offers_to_preprocess_it(configured, dataset_dir, tmp_path, monkeypatch):
    from sidestep.models.select import choose_model

    songs = tmp_path / "songs"
    songs.mkdir()
    (songs / "a.wav").write_bytes(b"RIFF")
    runs = []

    def fake_run(asker, config):  # the encoding itself is preprocess's own test; here: what the wizard asks
        runs.append(config)
        return SimpleNamespace(done=[1], skipped=[], output_dir=dataset_dir)

    monkeypatch.setattr(pf, "_run", fake_run)
    answers = {"model": choose_model(None, None, base_variant="base")}
    asker = ScriptedAsker([str(songs), "y", "", "", "y"])
    assert wc.ask_dataset(asker, answers) == dataset_dir
    assert runs[0].audio_dir == songs.resolve() and answers["scan"].files
    assert asker.asked[1].message.startswith(f"{songs.resolve()} holds 1 audio files")
    asker = ScriptedAsker([str(songs), "n", str(dataset_dir)])  # declined: the folder is asked again
    assert wc.ask_dataset(asker, answers) == dataset_dir.resolve() and len(runs) == 1


@pytest.mark.parametrize("where", ["settings set", "environment"])
def test_setup_counts_as_done_once_a_checkpoint_folder_is_set_anywhere(checkpoint_root, monkeypatch, where):
    if where == "settings set":
        settings.set_value("checkpoint_dir", str(checkpoint_root))
        assert settings.load_settings().first_run_done
    else:
        monkeypatch.setenv("SIDESTEP_CHECKPOINT_DIR", str(checkpoint_root))
    asker = ScriptedAsker(["Quit"])
    run_wizard(asker)
    assert [q.message for q in asker.asked] == ["What do you want to do?"]  # no first-run questions


def test_a_lone_b_goes_back_even_right_after_a_rejected_answer():
    with pytest.raises(Back):
        _typed("x\rb\r\x03", lambda a: a.integer("n", default=5, lo=1, hi=9))  # Ctrl-C: ends it if b did not
    with pytest.raises(Back):
        _typed("/no/such/folder\rb\r\x03", lambda a: a.folder("where"))
    assert _typed("x\r\x7f7\r", lambda a: a.integer("n", default=5, lo=1, hi=9)) == 7  # other keys still edit


def test_type_ahead_is_flushed_on_a_terminal_and_left_alone_otherwise():
    import io
    import os
    import pty
    import select

    master, slave = pty.openpty()
    try:
        os.write(master, b"y\r")
        with os.fdopen(os.dup(slave), "rb", buffering=0) as stream:
            assert select.select([slave], [], [], 1.0)[0]  # the keys are waiting
            flush_typeahead(stream)
            assert not select.select([slave], [], [], 0.2)[0]  # and gone
    finally:
        os.close(master)
        os.close(slave)
    flush_typeahead(io.StringIO("y\n"))  # not a terminal: nothing to do, no error
