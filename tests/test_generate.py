"""`sidestep generate` and samples during `train` on a tiny real checkpoint with a tiny real VAE and text encoder.

The tiny models make noise, not music: these tests check durations, the sample rate, determinism, and that
an adapter (and only an adapter) changes the render.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sidestep.errors import ConfigError
from sidestep.generation import MAX_DURATION_S, PromptDefaults, read_prompts, resolve_settings
from sidestep.models import resolve_runtime, variant_defaults
from sidestep.testing.tiny_audio import write_preprocess_components
from sidestep.training import saving
from sidestep.training.config import TrainConfig
from sidestep.training.export import export_adapter
from sidestep.training.run import train
from train_support import tiny_setup
from cli_support import run_cli as _main

CPU = resolve_runtime("cpu", "fp32", False)
RENDER = ["--device", "cpu", "--precision", "fp32", "--steps", "2", "--duration", "0.6"]
PROMPT = "bright synth chord"


def _train_config(dataset: Path, out: Path, **extra) -> TrainConfig:
    values = dict(dataset_dir=dataset, output_dir=out, rank=4, lr=1e-2, max_steps=4, warmup_steps=0, save_every=0,
                  ignore_fisher_map=True)
    values.update(extra)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def listen(tmp_path_factory):
    """A tiny checkpoint root with VAE + text encoder, a dataset, and an adapter trained hard enough to be heard."""
    root = tmp_path_factory.mktemp("listen")
    choice, dataset = tiny_setup(root, samples=3)
    write_preprocess_components(choice.checkpoint_dir, text_hidden_dim=32, seed=0)
    outcome = train(_train_config(dataset, root / "trained"), choice, CPU)
    exported = {fmt: export_adapter(outcome.final_dir, root / "exported" / fmt, fmt).path
                for fmt in ("comfyui", "diffusers")}
    return choice, dataset, root / "trained", exported


def _generate(monkeypatch, capsys, listen, out: Path, *extra: str) -> tuple[int, str, str]:
    choice = listen[0]
    return _main(monkeypatch, capsys, "generate", "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base",
                 "--out", str(out), *RENDER, *extra)


def _audio(path: Path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == 48000
    return data


def test_generate_writes_48k_stereo_wav_of_the_requested_duration_and_its_settings(monkeypatch, capsys, listen,
                                                                                    tmp_path):
    code, out, err = _generate(monkeypatch, capsys, listen, tmp_path / "o", "--prompt", PROMPT, "--duration", "1.2",
                               "--seed", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    wav = tmp_path / "o" / "bright-synth-chord.wav"
    info = sf.info(str(wav))
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 57600)  # 1.2 s = 30 latent frames x 1920
    settings = json.loads((tmp_path / "o" / "bright-synth-chord.json").read_text())
    assert settings["prompt"]["seed"] == 3 and settings["prompt"]["duration"] == 1.2
    assert settings["settings"] == {"steps": 2, "guidance": 7.0, "shift": 1.0} == {k: result[k] for k in settings["settings"]}
    assert settings["adapter"] is None and settings["files"] == {"base": "bright-synth-chord.wav"}
    assert np.abs(_audio(wav)).max() > 0.5  # normalised to -1 dBFS by the pipeline


def test_same_seed_gives_identical_audio_and_another_seed_does_not(monkeypatch, capsys, listen, tmp_path):
    runs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        code, _, err = _generate(monkeypatch, capsys, listen, tmp_path / name, "--prompt", PROMPT, "--seed", seed)
        assert code == 0, err
        runs[name] = _audio(tmp_path / name / "bright-synth-chord.wav")
    assert np.array_equal(runs["a"], runs["b"])
    assert np.abs(runs["a"] - runs["c"]).max() > 1e-2


def test_strength_zero_is_the_base_model_and_the_trained_adapter_changes_the_render(monkeypatch, capsys, listen,
                                                                                  tmp_path):
    trained = listen[2]
    renders = {}
    for name, extra in (("base", ()), ("zero", ("--adapter", str(trained), "--strength", "0")),
                        ("half", ("--adapter", str(trained), "--strength", "0.5")),
                        ("full", ("--adapter", str(trained)))):
        code, _, err = _generate(monkeypatch, capsys, listen, tmp_path / name, "--prompt", PROMPT, *extra)
        assert code == 0, err
        renders[name] = _audio(tmp_path / name / "bright-synth-chord.wav")
    assert np.array_equal(renders["zero"], renders["base"])
    assert np.abs(renders["full"] - renders["base"]).max() > 1e-3
    assert np.abs(renders["half"] - renders["base"]).max() > 1e-4
    assert np.abs(renders["half"] - renders["full"]).max() > 1e-4


def test_compare_renders_base_and_adapter_side_by_side(monkeypatch, capsys, listen, tmp_path):
    code, _, err = _generate(monkeypatch, capsys, listen, tmp_path / "cmp", "--prompt", PROMPT, "--compare",
                             "--adapter", str(listen[2] / "final"))
    assert code == 0, err
    code, _, err = _generate(monkeypatch, capsys, listen, tmp_path / "base", "--prompt", PROMPT)
    assert code == 0, err
    base = _audio(tmp_path / "base" / "bright-synth-chord.wav")
    assert np.array_equal(_audio(tmp_path / "cmp" / "bright-synth-chord.base.wav"), base)
    assert np.abs(_audio(tmp_path / "cmp" / "bright-synth-chord.adapter.wav") - base).max() > 1e-3
    record = json.loads((tmp_path / "cmp" / "bright-synth-chord.json").read_text())
    assert record["files"] == {"adapter": "bright-synth-chord.adapter.wav", "base": "bright-synth-chord.base.wav"}


def test_exported_comfyui_and_diffusers_files_render_like_the_adapter_folder(monkeypatch, capsys, listen, tmp_path):
    _, _, trained, exported = listen
    renders = {}
    for name, source in (("folder", trained / "final"), *exported.items()):
        code, _, err = _generate(monkeypatch, capsys, listen, tmp_path / name, "--prompt", PROMPT, "--adapter",
                                 str(source))
        assert code == 0, err
        renders[name] = _audio(tmp_path / name / "bright-synth-chord.wav")
    for name in exported:
        np.testing.assert_allclose(renders[name], renders["folder"], atol=1e-4, err_msg=name)


def test_prompts_file_renders_each_entry_with_its_own_duration_and_seed(monkeypatch, capsys, listen, tmp_path):
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('[[prompts]]\nname = "one"\nprompt = "calm piano"\nduration = 0.4\n\n'
                       '[[prompts]]\nprompt = "noise bursts, drums"\nbpm = 120\nseed = 9\n', encoding="utf-8")
    code, out, err = _generate(monkeypatch, capsys, listen, tmp_path / "o", "--prompts", str(prompts), "--json")
    assert code == 0, err
    clips = json.loads(out)["clips"]
    assert [c["name"] for c in clips] == ["one", "02-noise-bursts-drums"]
    assert sf.info(str(tmp_path / "o" / "one.wav")).frames == 10 * 1920
    assert sf.info(str(tmp_path / "o" / "02-noise-bursts-drums.wav")).frames == 15 * 1920  # --duration 0.6
    second = json.loads((tmp_path / "o" / "02-noise-bursts-drums.json").read_text())["prompt"]
    assert second["seed"] == 9 and second["bpm"] == 120


def _bad_inputs(tmp: Path, listen) -> list[tuple[list[str], str]]:
    (tmp / "broken.toml").write_text("[[prompts]\nprompt = ", encoding="utf-8")
    (tmp / "empty.json").write_text("[]", encoding="utf-8")
    (tmp / "notes.txt").write_text("not an adapter", encoding="utf-8")
    (tmp / "folder").mkdir()
    (tmp / "taken").mkdir()
    (tmp / "taken" / "bright-synth-chord.wav").write_bytes(b"keep me")
    return [
        (["--prompts", str(tmp / "broken.toml")], "does not parse as TOML"),
        (["--prompts", str(tmp / "empty.json")], "the prompt list is empty"),
        (["--prompt", PROMPT, "--duration", "0"], "must be more than 0 seconds"),
        (["--prompt", PROMPT, "--duration", str(MAX_DURATION_S + 1)], "beyond the model's limit"),
        (["--prompt", PROMPT, "--adapter", str(tmp / "notes.txt")], "cannot be read as safetensors"),
        (["--prompt", PROMPT, "--adapter", str(tmp / "folder")], "holds no adapter"),
        (["--prompt", PROMPT, "--adapter", str(tmp / "missing")], "does not exist"),
        (["--prompt", PROMPT, "--strength", "0.5"], "--strength needs --adapter"),
        ([], "Nothing to render"),
        (["--prompt", PROMPT, "--out", str(tmp / "taken")], "already exists; pass --overwrite"),
    ]


def test_bad_input_is_one_sentence_before_any_model_loads(monkeypatch, capsys, listen, tmp_path):
    import sidestep.training.generate as gen

    monkeypatch.setattr(gen, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for args, message in _bad_inputs(tmp_path, listen):
        code, out, err = _generate(monkeypatch, capsys, listen, tmp_path / "o", *args)
        assert code == 1 and message in err, (args, err)
        assert "Traceback" not in err and err.count("Error:") == 1 and out == ""
    assert (tmp_path / "taken" / "bright-synth-chord.wav").read_bytes() == b"keep me"


def test_missing_vae_or_text_encoder_is_named_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import sidestep.training.generate as gen

    monkeypatch.setattr(gen, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    choice, _ = tiny_setup(tmp_path, samples=1)
    args = ["generate", "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", "--prompt", PROMPT,
            "--out", str(tmp_path / "o"), *RENDER]
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 1 and "No VAE found" in err and "Traceback" not in err
    write_preprocess_components(choice.checkpoint_dir, text_hidden_dim=32)
    import shutil

    shutil.rmtree(choice.checkpoint_dir / "Qwen3-Embedding-0.6B")
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 1 and "No text encoder found" in err


def test_overwrite_replaces_an_existing_render(monkeypatch, capsys, listen, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "bright-synth-chord.wav").write_bytes(b"old")
    code, _, err = _generate(monkeypatch, capsys, listen, tmp_path / "o", "--prompt", PROMPT, "--overwrite")
    assert code == 0, err
    assert sf.info(str(tmp_path / "o" / "bright-synth-chord.wav")).frames == 15 * 1920


def test_variant_defaults_turbo_without_guidance_base_with_it():
    turbo = resolve_settings(variant_defaults("turbo"))
    base = resolve_settings(variant_defaults("base"))
    assert (turbo.steps, turbo.guidance, turbo.shift) == (8, 1.0, 3.0)
    assert (base.steps, base.guidance) == (50, 7.0) and base.guidance > 1.0
    with pytest.raises(ConfigError, match="turbo models have guidance distilled"):
        resolve_settings(variant_defaults("turbo"), guidance=5.0)
    with pytest.raises(ConfigError, match="--steps"):
        resolve_settings(variant_defaults("base"), steps=0)


def test_prompts_files_in_json_and_toml_with_defaults(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["plain text", {"prompt": "with fields", "duration": 12, "seed": 4,
                                                                  "keyscale": "A minor"}]), encoding="utf-8")
    (tmp_path / "p.toml").write_text('[[prompts]]\nprompt = "plain text"\n', encoding="utf-8")
    (tmp_path / "dup.json").write_text(json.dumps([{"prompt": "a", "name": "x"}, {"prompt": "b", "name": "x"}]),
                                       encoding="utf-8")
    (tmp_path / "odd.json").write_text(json.dumps([{"prompt": "a", "tempo": 3}]), encoding="utf-8")
    first, second = read_prompts(tmp_path / "p.json", PromptDefaults(duration=20.0, seed=7))
    assert (first.prompt, first.duration, first.seed, first.lyrics) == ("plain text", 20.0, 7, "[Instrumental]")
    assert (second.duration, second.seed, second.keyscale) == (12.0, 4, "A minor")
    (toml_first,) = read_prompts(tmp_path / "p.toml", PromptDefaults(duration=20.0, seed=7))
    assert toml_first == first
    with pytest.raises(ConfigError, match="share the name 'x'"):
        read_prompts(tmp_path / "dup.json")
    with pytest.raises(ConfigError, match="unknown field 'tempo'"):
        read_prompts(tmp_path / "odd.json")


# ---- samples during training ---------------------------------------------------------------------------


@pytest.mark.slow
def test_train_samples_at_0_3_6_and_ends_with_the_same_adapter_as_without(listen, tmp_path, monkeypatch, capsys):
    choice, dataset, _, _ = listen
    prompts = tmp_path / "samples.json"
    prompts.write_text(json.dumps([{"name": "probe", "prompt": PROMPT, "duration": 0.6, "seed": 1}]), encoding="utf-8")
    # Adapter dropout draws from the global RNG: a sampler that disturbed it would change the adapter.
    common = dict(max_steps=6, dropout=0.1, lr=1e-3)
    events = []
    train(_train_config(dataset, tmp_path / "plain", **common), choice, CPU)
    train(_train_config(dataset, tmp_path / "sampled", sample_every=3, sample_prompts=prompts, sample_steps=2,
                        **common), choice, CPU, events.append)
    plain = saving.read_adapter_dir(tmp_path / "plain" / "final").tensors
    sampled = saving.read_adapter_dir(tmp_path / "sampled" / "final").tensors
    assert plain.keys() == sampled.keys() and all(torch.equal(plain[k], sampled[k]) for k in plain)

    steps = sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir())
    assert steps == ["step-0", "step-3", "step-6"]
    renders = {s: _audio(tmp_path / "sampled" / "samples" / s / "probe.wav") for s in steps}
    assert all(r.shape == (15 * 1920, 2) for r in renders.values())
    assert np.abs(renders["step-6"] - renders["step-0"]).max() > 1e-4  # training changed what it sounds like
    assert [e.step for e in events if type(e).__name__ == "SamplesSaved"] == [0, 3, 6]

    # Step 0 is the base model, rendered exactly as `sidestep generate` renders it (same prompt, seed, steps).
    code, _, err = _main(monkeypatch, capsys, "generate", "--checkpoint-dir", str(choice.checkpoint_dir), "--model",
                         "base", "--out", str(tmp_path / "gen"), "--prompts", str(prompts), *RENDER)
    assert code == 0, err
    np.testing.assert_allclose(renders["step-0"], _audio(tmp_path / "gen" / "probe.wav"), atol=1e-6)


def test_train_sampling_flags_fail_before_any_model_loads(monkeypatch, capsys, listen, tmp_path):
    import sidestep.training.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    choice, dataset, _, _ = listen
    (tmp_path / "empty.toml").write_text("prompts = []\n", encoding="utf-8")
    base = ["train", "--dataset-dir", str(dataset), "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base",
            "--device", "cpu", "--max-steps", "2"]
    for extra, message in ((["--sample-every", "2", "--sample-prompts", str(tmp_path / "empty.toml")], "prompt list is empty"),
                           (["--sample-prompts", str(tmp_path / "empty.toml")], "needs --sample-every"),
                           (["--sample-every", "-1"], "--sample-every must be")):
        code, _, err = _main(monkeypatch, capsys, *base, "--output-dir", str(tmp_path / "o"), *extra)
        assert code == 1 and message in err and "Traceback" not in err, (extra, err)


def test_train_default_sample_prompt_comes_from_a_dataset_caption(listen, tmp_path):
    from sidestep.data import scan_dataset
    from sidestep.models.variants import with_config
    from sidestep.training.sampling import plan_samples

    choice, dataset, _, _ = listen
    config = _train_config(dataset, tmp_path / "o", sample_every=5)
    variant = with_config(variant_defaults("base"), choice.entry.config)
    plan = plan_samples(config, choice.entry, choice.checkpoint_dir, variant, scan_dataset(dataset).files)
    (prompt,) = plan.prompts
    assert prompt.prompt == "synthetic song 0" and prompt.lyrics == "[Instrumental]" and 0 < prompt.duration <= 30
    assert plan.every == 5 and plan.settings.steps == 50


# ---- the wizard's Generate -----------------------------------------------------------------------------


def test_wizard_generate_renders_adapter_and_base_and_asks_before_replacing(listen, tmp_path, monkeypatch):
    from sidestep import settings
    from sidestep.wizard import generate_flow as gf
    from sidestep.wizard.asker import ScriptedAsker
    from sidestep.wizard.common import Session
    from sidestep.wizard.menu import MENU

    assert "generate" in [option.value for option in MENU]
    choice, _, trained, _ = listen
    settings.save_settings(settings.Settings(checkpoint_dir=choice.checkpoint_dir, first_run_done=True))
    monkeypatch.setenv("SIDESTEP_DEVICE", "cpu")
    out = tmp_path / "wiz"
    script = ["", str(tmp_path / "nothing-here"), str(trained), "", "y", PROMPT, "", "0.6", "4", str(out), "y"]
    asker = ScriptedAsker(list(script))
    gf.generate_flow(asker, Session())
    assert any("does not exist" in e for e in asker.errors)  # a bad adapter path is asked again
    assert {p.name for p in out.glob("*.wav")} == {"bright-synth-chord.adapter.wav", "bright-synth-chord.base.wav"}
    assert json.loads((out / "bright-synth-chord.json").read_text())["prompt"]["seed"] == 4

    # The same prompt into the same folder: the wizard asks before replacing; "n" goes back to the folder.
    asker = ScriptedAsker(["", "", PROMPT, "", "0.6", "", str(out), "n", str(tmp_path / "other"), "y"])
    gf.generate_flow(asker, Session())
    assert (tmp_path / "other" / "bright-synth-chord.wav").is_file()


def test_each_prompt_is_encoded_once_and_the_text_encoder_can_stay_on_the_cpu(listen):
    from sidestep.data.encoders import load_encoders
    from sidestep.generation import Renderer, make_prompt
    from sidestep.models import load_model

    choice = listen[0]
    loaded = load_model(choice.entry, CPU)
    encoders = load_encoders(choice.entry, choice.checkpoint_dir, CPU)
    calls = []
    encoders.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    renderer = Renderer(loaded.transformer, encoders, loaded.variant)
    settings = resolve_settings(loaded.variant, steps=1)
    first = make_prompt("a", {"prompt": PROMPT, "duration": 0.2}, PromptDefaults())
    second = make_prompt("b", {"prompt": "dark drones", "duration": 0.2}, PromptDefaults())
    one = renderer.render(first, settings)
    assert np.array_equal(renderer.render(first, settings), one) and len(calls) == 1
    renderer.render(second, settings)
    assert len(calls) == 2


def test_a_failed_sample_render_warns_and_training_goes_on(listen, tmp_path, monkeypatch):
    from sidestep.generation import render
    from sidestep.training.events import Notice

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(render.Renderer, "render", out_of_memory)
    choice, dataset, _, _ = listen
    events = []
    outcome = train(_train_config(dataset, tmp_path / "o", max_steps=2, sample_every=1), choice, CPU, events.append)
    assert outcome.steps == 2 and (tmp_path / "o" / "final").is_dir()
    warnings = [e.message for e in events if isinstance(e, Notice) and "Samples at step" in e.message]
    assert warnings == ["Samples at step 0 failed (CUDA out of memory. Tried to allocate 2.00 GiB); training goes "
                        "on without samples."]


def test_tensorboard_reporter_sends_samples_as_mono_audio(tmp_path):
    from sidestep.generation import write_wav
    from sidestep.training.events import SamplesSaved
    from sidestep.training.report import TensorBoardReporter

    class Writer:  # TensorBoard's SummaryWriter.add_audio signature; tensorboard itself is optional
        def __init__(self):
            self.calls = []

        def add_audio(self, tag, snd_tensor, global_step=None, sample_rate=44100):
            self.calls.append((tag, tuple(snd_tensor.shape), global_step, sample_rate))

        def close(self):
            pass

    wav = write_wav(tmp_path / "samples" / "step-3" / "probe.wav", np.zeros((2, 4800), dtype=np.float32), 48000)
    reporter = TensorBoardReporter(Writer())
    reporter.samples(SamplesSaved(3, (wav,), 48000, 0.5))
    assert reporter.writer.calls == [("samples/probe", (1, 4800), 3, 48000)]
