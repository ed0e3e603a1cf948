"""`sidestep preprocess` on tiny real-architecture VAE / text encoder / condition encoder and generated audio.

The tiny VAE runs its first block at the real 48 kHz with 128 channels, so every clip here is short.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from sidestep.cli.app import main
from sidestep.data import DatasetSpec, collate, load_sample, scan_dataset
from sidestep.data.audio import Audio, load_audio, split_audio
from sidestep.data.encoders import (
    LYRIC_MAX_LENGTH,
    TEXT_MAX_LENGTH,
    encode_audio,
    encode_condition,
    load_encoders,
)
from sidestep.data.metadata import DEFAULT_CAPTION, TrackMeta, format_prompt, read_dataset_json, resolve_metadata
from sidestep.data.preprocess import PreprocessConfig, Stage, preprocess_audio
from sidestep.errors import AudioError, CheckpointError, ConfigError, Interrupted
from sidestep.models import find_model, load_model, resolve_runtime
from sidestep.objective import flow_matching_loss, noise_like
from sidestep.testing.tiny import tiny_config, write_diffusers_checkpoint, write_original_checkpoint
from sidestep.testing.tiny_audio import write_audio_clips, write_preprocess_components

CPU = resolve_runtime("cpu", "fp32", False)
L_EXPECTED = LYRIC_MAX_LENGTH + 1 + TEXT_MAX_LENGTH  # 769


@pytest.fixture(scope="module")
def cfg() -> dict:
    return tiny_config(num_layers=2, hidden=64)


@pytest.fixture(scope="module")
def root(tmp_path_factory, cfg) -> Path:
    """A checkpoint root like users have: the model (both layouts), vae/ and Qwen3-Embedding-0.6B/."""
    folder = tmp_path_factory.mktemp("ckpt")
    write_original_checkpoint(folder, cfg, seed=0)
    write_diffusers_checkpoint(folder, cfg, seed=0)
    # diffusers' converter keeps a copy of the silence latent at the pipeline root; the tiny writer does not
    shutil.copy(folder / "acestep-v15-base" / "silence_latent.pt", folder / "acestep-v15-base-diffusers")
    write_preprocess_components(folder, text_hidden_dim=cfg["text_hidden_dim"], seed=0)
    return folder


@pytest.fixture(scope="module")
def encoders(root):
    return load_encoders(find_model(root, "base"), root, CPU)


def _write_bad_files(folder: Path) -> None:
    (folder / "bad_corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" + bytes(range(200)))
    sf.write(str(folder / "bad_empty.wav"), np.zeros((0, 2), dtype=np.float32), 48000)
    sf.write(str(folder / "bad_silent.flac"), np.zeros((9600, 2), dtype=np.float32), 48000)
    (folder / "bad_aac.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(64))


def _config(audio: Path, out: Path, root: Path, **kw) -> PreprocessConfig:
    return PreprocessConfig(audio_dir=audio, output_dir=out, checkpoint_dir=root, model="base", runtime=CPU, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, root):
    """One run over good clips (with JSON, sidecar and no metadata) and bad files; outputs chunked at 1 s."""
    audio = tmp_path_factory.mktemp("audio")
    write_audio_clips(audio, [("a_tone.wav", "tone", 1.6, 48000, 2), ("b_mono44k.wav", "chord", 0.6, 44100, 1),
                              ("c_noise.ogg", "noise", 0.4, 48000, 2)], seed=1)
    (audio / "a_tone.json").write_text(json.dumps({"caption": "from sidecar", "keyscale": "D minor"}))
    (audio / "b_mono44k.caption.txt").write_text("a chord from the caption file")
    (audio / "b_mono44k.lyrics.txt").write_text("[Verse]\nla la la")
    _write_bad_files(audio)
    dataset_json = audio.parent / "meta.json"
    dataset_json.write_text(json.dumps({"samples": [
        {"audio_path": "/elsewhere/a_tone.wav", "caption": "from json", "lyrics": "oh oh", "bpm": 100,
         "language": "en"},
        {"filename": "missing_song.wav", "caption": "names no file"}]}))
    events = []
    out = audio.parent / "out"
    summary = preprocess_audio(_config(audio, out, root, dataset_json=dataset_json, max_duration=1.0), events.append)
    return types.SimpleNamespace(audio=audio, out=out, summary=summary, events=events, json=dataset_json)


# ---- audio ---------------------------------------------------------------------------------------


def test_load_audio_makes_stereo_at_the_target_rate(tmp_path):
    t = np.arange(22050) / 44100
    sf.write(str(tmp_path / "mono.wav"), (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100)
    three = np.stack([np.full(4800, 0.1), np.full(4800, 0.2), np.full(4800, 0.9)], axis=1).astype(np.float32)
    sf.write(str(tmp_path / "three.wav"), three, 48000)
    mono = load_audio(tmp_path / "mono.wav", 48000)
    assert mono.samples.shape == (2, 24000) and mono.samples.dtype == np.float32
    assert np.array_equal(mono.samples[0], mono.samples[1]) and abs(mono.duration - 0.5) < 1e-6
    kept = load_audio(tmp_path / "three.wav", 48000).samples
    assert kept.shape == (2, 4800) and np.allclose(kept[0], 0.1, atol=1e-4) and np.allclose(kept[1], 0.2, atol=1e-4)


@pytest.mark.parametrize("name, words", [("bad_corrupt.wav", "cannot decode"), ("bad_empty.wav", "empty"),
                                         ("bad_silent.flac", "silent"), ("bad_aac.m4a", "convert it")])
def test_bad_audio_is_one_sentence_naming_the_file(tmp_path, name, words):
    _write_bad_files(tmp_path)
    with pytest.raises(AudioError) as err:
        load_audio(tmp_path / name, 48000)
    message = str(err.value)
    assert message.startswith(name) and words in message and "\n" not in message


def test_split_audio_gives_equal_hop_aligned_chunks():
    audio = Audio(Path("x.wav"), np.ones((2, 48000 * 5 + 100), dtype=np.float32), 48000)
    chunks = split_audio(audio, 2.0, align=1920)
    assert len(chunks) == 3 and sum(c.samples.shape[1] for c in chunks) == audio.samples.shape[1]
    assert all(c.samples.shape[1] % 1920 == 0 and c.duration <= 2.0 for c in chunks[:-1])
    assert chunks[1].offset == pytest.approx(chunks[0].duration)
    assert split_audio(audio, None) == [audio] and split_audio(audio, 10.0) == [audio]


# ---- encoders ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiled_vae_encoding_matches_untiled(encoders):
    rng = np.random.default_rng(0)
    t = np.arange(int(0.8 * 48000)) / 48000
    wave = np.stack([np.sin(2 * np.pi * 220 * t), 0.5 * rng.standard_normal(t.size)]).astype(np.float32) * 0.5
    whole = encode_audio(encoders, wave, torch.Generator().manual_seed(3))
    tiled = encode_audio(encoders, wave, torch.Generator().manual_seed(3), tile_seconds=0.4, overlap_seconds=0.12)
    assert whole.shape == tiled.shape == (20, 64) and whole.dtype == torch.float32
    diff = (whole - tiled).abs()  # tile edges see less context than the 0.12 s overlap would need to be exact
    assert diff.mean() < 2e-3 and diff.max() < 0.05, (diff.mean(), diff.max())
    again = encode_audio(encoders, wave, torch.Generator().manual_seed(4))
    assert not torch.allclose(whole, again)  # a posterior sample, not the mean


def test_diffusers_layout_condition_encoder_matches_original(root, encoders):
    other = load_encoders(find_model(root, "acestep-v15-base-diffusers"), root, CPU)
    prompt = format_prompt("rock, guitar", TrackMeta(bpm=120), 30.0)
    a_states, a_mask = encode_condition(encoders, prompt, "[Verse]\nhello")
    b_states, b_mask = encode_condition(other, prompt, "[Verse]\nhello")
    assert a_states.shape == (L_EXPECTED, 64) and a_mask.dtype == torch.bool
    assert torch.equal(a_mask, b_mask) and torch.allclose(a_states, b_states, atol=1e-6)
    assert torch.equal(encoders.silence_latent, other.silence_latent)
    valid = int(a_mask.sum())
    assert a_mask[:valid].all() and not a_mask[valid:].any()  # valid rows first
    assert a_states[valid:].abs().sum() > 0  # the padding rows are encoder outputs, not zeros


def _copy_model(root: Path, tmp_path: Path) -> Path:
    new_root = tmp_path / "ckpt"
    shutil.copytree(root / "acestep-v15-base", new_root / "acestep-v15-base")
    for name in ("vae", "Qwen3-Embedding-0.6B"):
        (new_root / name).symlink_to(root / name)
    return new_root


@pytest.mark.parametrize("change, words", [("drop", "1 missing"), ("extra", "1 unexpected")])
def test_condition_encoder_loads_strictly(root, tmp_path, change, words):
    new_root = _copy_model(root, tmp_path)
    weights = new_root / "acestep-v15-base" / "model.safetensors"
    state = load_file(str(weights))
    if change == "drop":
        del state[next(k for k in state if k.startswith("encoder.lyric_encoder."))]
    else:
        state["encoder.bogus.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=words):
        load_encoders(find_model(new_root, "base"), new_root, CPU)


def test_missing_vae_is_one_sentence(root, tmp_path):
    new_root = _copy_model(root, tmp_path)
    (new_root / "vae").unlink()
    with pytest.raises(CheckpointError, match="No VAE found"):
        load_encoders(find_model(new_root, "base"), new_root, CPU)


# ---- metadata ------------------------------------------------------------------------------------


def test_prompt_is_the_pipeline_sft_prompt():
    from diffusers.pipelines.ace_step.pipeline_ace_step import AceStepPipeline

    fake = types.SimpleNamespace(_build_metadata_string=AceStepPipeline._build_metadata_string)
    expected, _ = AceStepPipeline._format_prompt(fake, prompt="lofi, piano", lyrics="", audio_duration=42.7,
                                                 bpm=90, keyscale="A minor", timesignature="4")
    assert format_prompt("lofi, piano", TrackMeta(bpm=90, keyscale="A minor", timesignature="4"), 42.7) == expected


def test_dataset_json_formats_and_errors(tmp_path):
    as_map = tmp_path / "map.json"
    as_map.write_text(json.dumps({"x.wav": {"caption": "c", "bpm": "N/A", "key": "C major", "instrumental": "yes"}}))
    meta = read_dataset_json(as_map).entries["x.wav"]
    assert (meta.caption, meta.bpm, meta.keyscale, meta.is_instrumental) == ("c", None, "C major", True)
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"file": "sub/y.flac", "lyrics": "hey", "bpm": 128.4}]))
    assert read_dataset_json(as_list).entries["sub/y.flac"].bpm == 128
    for bad, words in (("{not json", "cannot read"), ('[{"caption": "no name"}]', "entry 0"),
                       ('{"x.wav": {"bpm": "fast"}}', "not a number")):
        as_map.write_text(bad)
        with pytest.raises(ConfigError, match=words):
            read_dataset_json(as_map)


def test_plain_txt_sidecar_is_lyrics_and_default_is_instrumental(tmp_path):
    (tmp_path / "s.wav").touch()
    assert resolve_metadata(tmp_path / "s.wav", "s.wav", None).caption == DEFAULT_CAPTION
    (tmp_path / "s.txt").write_text("sing along")
    resolved = resolve_metadata(tmp_path / "s.wav", "s.wav", None)
    assert (resolved.lyrics, resolved.is_instrumental, resolved.source.value) == ("sing along", False, "sidecar")


# ---- the preprocessing run -----------------------------------------------------------------------


def test_outputs_have_the_spec_keys_shapes_and_dtypes(run, encoders):
    names = sorted(p.name for p in run.out.iterdir())
    assert names == ["a_tone.part01.pt", "a_tone.part02.pt", "b_mono44k.pt", "c_noise.pt"]
    for path in run.out.iterdir():
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                            "context_latents", "metadata"}
        frames = raw["target_latents"].shape[0]
        assert raw["target_latents"].shape == (frames, 64) and raw["target_latents"].dtype == torch.float32
        assert torch.equal(raw["attention_mask"], torch.ones(frames))
        assert raw["encoder_hidden_states"].shape == (L_EXPECTED, 64)
        assert raw["encoder_attention_mask"].shape == (L_EXPECTED,) and raw["encoder_attention_mask"].dtype == torch.bool
        context = raw["context_latents"]
        assert context.shape == (frames, 128) and torch.equal(context[:, 64:], torch.ones(frames, 64))
        assert torch.equal(context[:, :64], encoders.silence_latent[:frames])
        meta = raw["metadata"]
        # 25 latent frames per second of (resampled) audio
        assert abs(frames - meta["duration"] * 25) <= 1, (path.name, frames, meta["duration"])
        assert meta["filename"] == Path(meta["source"]).name and len(meta["sha"]) == 64


def test_latent_length_follows_duration(run):
    by_name = {o.source: o for o in run.summary.outcomes}
    assert by_name["a_tone.wav"].duration == pytest.approx(1.6, abs=1e-3)
    assert by_name["b_mono44k.wav"].duration == pytest.approx(0.6, abs=1e-3)  # 44.1 kHz -> 48 kHz keeps time
    frames = [load_sample(run.out / f"a_tone.part0{i}.pt").length for i in (1, 2)]
    assert sum(frames) == 40  # 1.6 s x 25


def test_dataset_layer_reads_outputs_and_the_dit_trains_on_them(run, root, cfg):
    spec = DatasetSpec.from_model_config(cfg)
    scan = scan_dataset(run.out, spec)
    assert len(scan.files) == 4 and scan.encoder_dim == 64 and not scan.problems
    loaded = load_model(find_model(root, "base"), CPU)
    loaded.transformer.requires_grad_(True)
    batch = collate([load_sample(scan.files[0], spec)])
    gen = torch.Generator().manual_seed(0)
    loss = flow_matching_loss(loaded.transformer, batch, torch.tensor([0.5]), noise_like(batch.target_latents, gen))
    loss.backward()
    grads = [p.grad for p in loaded.transformer.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


def test_metadata_precedence_json_then_sidecar_then_default(run):
    meta = {p.stem: torch.load(p, weights_only=True)["metadata"] for p in run.out.iterdir()}
    a = meta["a_tone.part01"]
    assert (a["caption"], a["lyrics"], a["bpm"], a["language"]) == ("from json", "oh oh", 100, "en")
    assert a["keyscale"] == "D minor" and a["metadata_source"] == "dataset json"  # sidecar fills what JSON lacks
    assert "# Caption\nfrom json\n" in a["prompt"] and "- bpm: 100" in a["prompt"]
    b = meta["b_mono44k"]
    assert (b["caption"], b["lyrics"], b["is_instrumental"], b["metadata_source"]) == (
        "a chord from the caption file", "[Verse]\nla la la", False, "sidecar")
    c = meta["c_noise"]
    assert (c["caption"], c["lyrics"], c["is_instrumental"], c["metadata_source"]) == (
        DEFAULT_CAPTION, "[Instrumental]", True, "default")
    assert [o.source for o in run.summary.defaulted] == ["c_noise.ogg"]
    assert run.summary.unmatched_json == ("missing_song.wav",)


def test_bad_files_are_reported_and_the_rest_continue(run):
    failed = {o.source: o.reason for o in run.summary.failed}
    assert set(failed) == {"bad_aac.m4a", "bad_corrupt.wav", "bad_empty.wav", "bad_silent.flac"}
    assert all(reason.startswith(name) for name, reason in failed.items())
    assert len(run.summary.done) == 3 and run.summary.total_duration == pytest.approx(2.6, abs=1e-2)
    stages = [e.stage for e in run.events]
    assert stages.count(Stage.LOAD_MODELS) == 1 and stages.count(Stage.WRITE) == 4
    assert stages.count(Stage.FINISH) == len(run.summary.outcomes) == 7


def _small_folder(tmp_path: Path) -> Path:
    audio = tmp_path / "audio"
    write_audio_clips(audio, [("x.wav", "chord", 1.08, 48000, 2), ("y.flac", "tone", 0.2, 48000, 2)], seed=2)
    return audio


@pytest.mark.slow
def test_rerun_skips_changes_redo_and_stale_chunks_go(tmp_path, root):
    audio, out = _small_folder(tmp_path), tmp_path / "out"
    first = preprocess_audio(_config(audio, out, root, max_duration=1.0))
    assert [o.outputs for o in first.done] == [("x.part01.pt", "x.part02.pt"), ("y.pt",)]
    events = []
    again = preprocess_audio(_config(audio, out, root, max_duration=1.0), events.append)
    assert len(again.skipped) == 2 and Stage.LOAD_MODELS not in [e.stage for e in events]
    assert again.skipped[0].duration == pytest.approx(1.08, abs=1e-2)
    (audio / "y.caption.txt").write_text("a new caption")  # metadata is part of what "up to date" means
    edited = preprocess_audio(_config(audio, out, root, max_duration=1.0))
    assert [o.source for o in edited.done] == ["y.flac"] and [o.source for o in edited.skipped] == ["x.wav"]
    whole = preprocess_audio(_config(audio, out, root))  # other settings: redone; x's old chunks removed
    assert len(whole.done) == 2 and sorted(p.name for p in out.iterdir()) == ["x.pt", "y.pt"]


@pytest.mark.slow
def test_interrupted_run_leaves_no_partial_pt_and_resumes(tmp_path, root):
    audio, out = tmp_path / "audio", tmp_path / "out"
    write_audio_clips(audio, [("p.wav", "tone", 0.2, 48000, 2), ("q.wav", "noise", 0.2, 48000, 2)], seed=3)

    def stop_at_second_write(event):
        if event.stage is Stage.WRITE and event.index == 1:  # the .pt is on disk under its temporary name
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="1 of 2 files"):
        preprocess_audio(_config(audio, out, root), stop_at_second_write)
    assert sorted(p.name for p in out.iterdir()) == ["p.pt"]  # no q.pt, no hidden .partial file
    resumed = preprocess_audio(_config(audio, out, root))
    assert [o.source for o in resumed.skipped] == ["p.wav"] and [o.source for o in resumed.done] == ["q.wav"]


def test_config_rejects_bad_flags(tmp_path, root):
    with pytest.raises(ConfigError, match="--audio-dir"):
        _config(tmp_path / "nope", tmp_path / "out", root)
    with pytest.raises(ConfigError, match="--max-duration"):
        _config(tmp_path, tmp_path / "out", root, max_duration=0.5)
    with pytest.raises(ConfigError, match="holds no audio"):
        preprocess_audio(_config(tmp_path, tmp_path / "out", root))


# ---- CLI -----------------------------------------------------------------------------------------


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["sidestep", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    try:
        main()
        code = 0
    except SystemExit as exited:
        code = exited.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_cli_json_force_and_exit_codes(monkeypatch, capsys, tmp_path, root):
    audio, out = tmp_path / "audio", tmp_path / "out"
    write_audio_clips(audio, [("z.wav", "sweep", 0.2, 48000, 2)], seed=4)
    base = ["preprocess", "--audio-dir", str(audio), "--output", str(out), "--checkpoint-dir", str(root),
            "--device", "cpu", "--precision", "fp32"]
    code, stdout, _ = _main(monkeypatch, capsys, *base, "--json")
    assert code == 0 and json.loads(stdout)["done"] == 1
    code, stdout, _ = _main(monkeypatch, capsys, *base, "--json")
    assert code == 0 and json.loads(stdout)["skipped"] == 1
    code, _, stderr = _main(monkeypatch, capsys, *base, "--force")
    assert code == 0 and "1 done, 0 skipped" in stderr and "z.wav" in stderr and "no metadata" in stderr
    _write_bad_files(audio)
    code, _, stderr = _main(monkeypatch, capsys, *base)
    assert code == 0 and "4 file(s) could not be preprocessed" in stderr


@pytest.mark.parametrize("case", ["missing dir", "only bad files", "bad max duration"])
def test_cli_errors_are_one_line(monkeypatch, capsys, tmp_path, root, case):
    audio = tmp_path / "audio"
    audio.mkdir()
    args = ["preprocess", "--audio-dir", str(audio), "--output", str(tmp_path / "out"),
            "--checkpoint-dir", str(root), "--device", "cpu"]
    if case == "missing dir":
        args[2] = str(tmp_path / "nope")
    elif case == "only bad files":
        _write_bad_files(audio)
    else:
        args += ["--max-duration", "0"]
    code, _, stderr = _main(monkeypatch, capsys, *args)
    error_lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(error_lines) == 1, stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
