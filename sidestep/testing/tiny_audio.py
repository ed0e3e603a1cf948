"""Tiny real-architecture preprocessing components and synthesized audio, written like a real checkpoint root.

- `<root>/vae`: a diffusers `AutoencoderOobleck` with the real sampling rate (48 kHz), downsampling
  ratios [2, 4, 4, 6, 10] (hop 1920, 25 latent frames per second) and latent width 64; only the
  channel multiples and the decoder are shrunk.
- `<root>/Qwen3-Embedding-0.6B`: a one-layer transformers `Qwen3Model` as wide as the DiT config's
  `text_hidden_dim`, with a byte-level BPE tokenizer trained here on a few strings (nothing is
  downloaded; `AutoTokenizer.from_pretrained` loads it offline).
- Audio clips: tones, chords, noise bursts and a mono 44.1 kHz file, written with soundfile.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

__all__ = ["TINY_VAE_CONFIG", "write_tiny_vae", "write_tiny_text_encoder", "write_preprocess_components",
           "write_audio_clips", "setup_demo_audio", "demo_clips"]

TINY_VAE_CONFIG: dict[str, Any] = {
    "encoder_hidden_size": 128,  # = 2 x latent width: the encoder emits mean and scale
    "downsampling_ratios": [2, 4, 4, 6, 10],
    "channel_multiples": [1, 1, 1, 1, 1],
    "decoder_channels": 8,
    "decoder_input_channels": 64,
    "audio_channels": 2,
    "sampling_rate": 48000,
}

# Text the tokenizer is trained on: the prompt template's words, captions and lyric tags.
_CORPUS = [
    "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n# Caption\n{}\n\n# Metas\n"
    "- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n",
    "instrumental music, ambient, piano, synth, drums, bass, noise, tone, chord, sine, bright, dark, calm, fast",
    "[Instrumental] [Verse] [Chorus] [Bridge] la la la, oh oh, walking down the street tonight",
    "N/A A minor E major G major D minor F major 90 100 110 128 140 seconds",
]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """Save a seeded tiny `AutoencoderOobleck` to `folder` (config.json + diffusion_pytorch_model.safetensors)."""
    import warnings

    from diffusers import AutoencoderOobleck

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # diffusers' Oobleck still uses the deprecated torch weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        vae = AutoencoderOobleck(**TINY_VAE_CONFIG)
    vae.save_pretrained(folder)
    return Path(folder)


def write_tiny_text_encoder(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a seeded one-layer `Qwen3Model` and an offline byte-level BPE tokenizer to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModel, PreTrainedTokenizerFast, Qwen3Config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    # Qwen's tokenizer pads with <|endoftext|> on the right; the prompt template ends with that token too.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        padding_side="right")
    heads = max(1, hidden_size // 16)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=1,
                         head_dim=hidden_size // heads, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with _quiet():
        AutoModel.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return Path(folder)


def write_preprocess_components(root: Path, text_hidden_dim: int = 32, seed: int = 0) -> Path:
    """`<root>/vae` and `<root>/Qwen3-Embedding-0.6B` beside the tiny model(s) already in `root`."""
    root = Path(root)
    write_tiny_vae(root / "vae", seed)
    write_tiny_text_encoder(root / "Qwen3-Embedding-0.6B", text_hidden_dim, seed)
    return root


def _envelope(n: int, rate: int) -> np.ndarray:
    fade = min(n // 4, int(0.02 * rate))
    env = np.ones(n, dtype=np.float32)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        env[:fade], env[-fade:] = ramp, ramp[::-1]
    return env


def _clip(kind: str, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """`[n, 2]` float32 in [-1, 1]: `tone`, `chord`, `noise` (bursts) or `sweep`."""
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    base = float(rng.uniform(110.0, 440.0))
    if kind == "tone":
        wave = np.sin(2 * math.pi * base * t)
    elif kind == "chord":
        wave = sum(np.sin(2 * math.pi * base * r * t) for r in (1.0, 1.25, 1.5)) / 3
    elif kind == "noise":
        gate = (np.sin(2 * math.pi * float(rng.uniform(2.0, 5.0)) * t) > 0).astype(np.float64)
        wave = rng.standard_normal(n) * gate * 0.5
    else:
        wave = np.sin(2 * math.pi * (base + 400.0 * t / seconds) * t)
    pan = float(rng.uniform(0.3, 0.7))
    stereo = np.stack([wave * pan, wave * (1 - pan)], axis=1) * 0.8
    return (stereo * _envelope(n, rate)[:, None]).astype(np.float32)


def write_audio_clips(folder: Path, clips: list[tuple[str, str, float, int, int]], seed: int = 0) -> list[Path]:
    """Write `(file name, kind, seconds, sample rate, channels)` clips; channels 1 writes the left channel only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name, kind, seconds, rate, channels in clips:
        data = _clip(kind, seconds, rate, rng)
        path = folder / name
        sf.write(str(path), data[:, :channels] if channels == 1 else data, rate)
        paths.append(path)
    return paths


_DEMO_KINDS = ("tone", "chord", "noise", "sweep")
_DEMO_CAPTIONS = {"tone": "a pure sine tone, calm", "chord": "a bright major chord, synth",
                  "noise": "noise bursts, drums", "sweep": "a rising synth sweep"}


def demo_clips(count: int = 6) -> list[tuple[str, str, float, int, int]]:
    """About 1.7 s per clip (>= 40 latent frames): the tiny VAE still runs its first block at 48 kHz x 128
    channels, so demo audio is kept short. Clip 4 is a mono 44.1 kHz file (resampling); the rest
    alternate wav and flac (bit-exact on rewrite, so a rerun of the demo finds its outputs up to date)."""
    clips = []
    for i in range(count):
        kind = _DEMO_KINDS[i % len(_DEMO_KINDS)]
        if i == 4:
            clips.append((f"{i:02d}_{kind}_mono44k.wav", kind, 1.6, 44100, 1))
        else:
            clips.append((f"{i:02d}_{kind}.{'flac' if i % 2 else 'wav'}", kind, 2.0 if i == 1 else 1.6, 48000, 2))
    return clips


def setup_demo_audio(root: Path, count: int = 6, text_hidden_dim: int = 32, seed: int = 0) -> Path:
    """Write `root/checkpoints/{vae, Qwen3-Embedding-0.6B}` and `count` clips with sidecar metadata in
    `root/audio/`. Returns the audio folder."""
    root = Path(root)
    write_preprocess_components(root / "checkpoints", text_hidden_dim, seed)
    audio = root / "audio"
    clips = demo_clips(count)
    for path, (_, kind, _, _, _) in zip(write_audio_clips(audio, clips, seed), clips, strict=True):
        sidecar = {"caption": _DEMO_CAPTIONS[kind], "bpm": 120, "keyscale": "C major", "is_instrumental": True}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return audio
