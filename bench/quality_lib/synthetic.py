"""Synthetic, structured, learnable latent distributions for the quality benchmark.

A `Law` maps a condition vector c (what a text/lyric encoder would say) to music-like latents [T, 64]:
every channel is a sum of harmonics whose frequency, amplitude and phase are functions of c, under a
slow envelope. The encoder states [L, D] the DiT sees are a fixed non-linear embedding of c, so the model
must read c through cross-attention to predict the content.

The base law is what the tiny DiT is pretrained on. A task is a *shift* of it (`shifted_law`), of three
kinds at once, each drawn from the task seed:
- texture: some channels change timbre (added harmonics, higher register);
- rhythm: some channels get a pulse envelope with a new period (a beat grid the base never had);
- mapping: the condition -> frequency/amplitude mapping of some channels changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sidestep.data.dataset import Batch, Sample, collate

LATENT = 64
CONTEXT = 128
FPS = 25.0
HARMONICS = 3
DEFAULT_LENGTHS = (48, 56, 64, 72, 80)


@dataclass(frozen=True)
class Law:
    """Fixed parameters of one latent distribution (all CPU float32 tensors)."""

    cond_dim: int
    enc_len: int
    enc_dim: int
    token_maps: torch.Tensor  # [L, D, C]: encoder token l = tanh(token_maps[l] @ c)
    freq0: torch.Tensor  # [64] base frequency (Hz at 25 latent frames per second)
    freq_map: torch.Tensor  # [64, C] log-frequency modulation by c
    amp_map: torch.Tensor  # [64, C] amplitude = 0.4 + 0.8 sigmoid(amp_map @ c)
    phase_map: torch.Tensor  # [64, C] per-channel phase offset from c
    harmonics: torch.Tensor  # [64, 3] weights of harmonics 1..3 (timbre)
    env_map: torch.Tensor  # [C] slow envelope rate modulation
    pulse_period: torch.Tensor  # [64] frames between pulses; 0 = smooth envelope (no pulse)
    pulse_decay: float
    silence: torch.Tensor  # [1500, 64] the "silence latent" used for context_latents
    noise_std: float = 0.05


def base_law(seed: int, enc_dim: int, cond_dim: int = 6, enc_len: int = 8) -> Law:
    """The pretraining distribution, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(cond_dim)
    return Law(
        cond_dim=cond_dim,
        enc_len=enc_len,
        enc_dim=enc_dim,
        token_maps=1.5 * scale * torch.randn(enc_len, enc_dim, cond_dim, generator=g),
        freq0=0.3 + 2.2 * torch.rand(LATENT, generator=g),
        freq_map=0.35 * scale * torch.randn(LATENT, cond_dim, generator=g),
        amp_map=1.5 * scale * torch.randn(LATENT, cond_dim, generator=g),
        phase_map=1.0 * scale * torch.randn(LATENT, cond_dim, generator=g),
        harmonics=torch.tensor([1.0, 0.0, 0.0]).repeat(LATENT, 1),
        env_map=0.5 * scale * torch.randn(cond_dim, generator=g),
        pulse_period=torch.zeros(LATENT),
        pulse_decay=2.0,
        silence=0.05 * torch.randn(1500, LATENT, generator=g),
    )


@dataclass(frozen=True)
class Shift:
    """What a task changes; recorded in the benchmark output so a reader knows what was learned."""

    texture_channels: tuple[int, ...]
    rhythm_channels: tuple[int, ...]
    mapping_channels: tuple[int, ...]
    pulse_period: int
    register: float  # frequency multiplier of the texture channels

    def as_dict(self) -> dict:
        return {"texture_channels": len(self.texture_channels), "rhythm_channels": len(self.rhythm_channels),
                "mapping_channels": len(self.mapping_channels), "pulse_period_frames": self.pulse_period,
                "register": round(self.register, 3)}


def shifted_law(base: Law, task_seed: int) -> tuple[Law, Shift]:
    """A new task of the same kind for every `task_seed`: texture + rhythm + condition-mapping shift."""
    g = torch.Generator().manual_seed(10_000 + task_seed)
    # 12 + 16 + 16 channels change; the other 20 keep the base law. Timbre changes only low channels
    # (fundamental < 1.2 Hz), so the added 2nd/3rd harmonics stay far below the 12.5 Hz Nyquist limit of 25 fps
    # latents: an aliased texture would be noise-like and unlearnable from a few samples.
    low = [int(i) for i in torch.nonzero(base.freq0 < 1.2).flatten()]
    low = [low[i] for i in torch.randperm(len(low), generator=g).tolist()][:12]
    rest = [i for i in torch.randperm(LATENT, generator=g).tolist() if i not in low]
    texture, rhythm, mapping = sorted(low), sorted(rest[:16]), sorted(rest[16:32])
    period = int(torch.tensor([6, 8, 10, 12])[torch.randint(4, (1,), generator=g)])
    register = float(1.1 + 0.3 * torch.rand(1, generator=g))

    harmonics = base.harmonics.clone()
    n = len(texture)
    h = torch.stack([torch.ones(n), 0.4 + 0.4 * torch.rand(n, generator=g), 0.2 + 0.3 * torch.rand(n, generator=g)], 1)
    harmonics[texture] = h
    freq0 = base.freq0.clone()
    freq0[texture] = freq0[texture] * register
    pulse = base.pulse_period.clone()
    pulse[rhythm] = float(period)
    scale = 1.0 / math.sqrt(base.cond_dim)
    freq_map, amp_map = base.freq_map.clone(), base.amp_map.clone()
    freq_map[mapping] = freq_map[mapping] + 0.35 * scale * torch.randn(len(mapping), base.cond_dim, generator=g)
    amp_map[mapping] = -amp_map[mapping]
    law = replace(base, harmonics=harmonics, freq0=freq0, pulse_period=pulse, freq_map=freq_map, amp_map=amp_map,
                  pulse_decay=float(1.5 + 1.5 * torch.rand(1, generator=g)))
    return law, Shift(tuple(texture), tuple(rhythm), tuple(mapping), period, register)


def draw_sample(law: Law, frames: int, g: torch.Generator, name: str) -> Sample:
    """One sample of `law` with `frames` latent frames, in the layout `sidestep.data.load_sample` returns."""
    c = torch.randn(law.cond_dim, generator=g)
    enc = torch.tanh(law.token_maps @ c) + 0.02 * torch.randn(law.enc_len, law.enc_dim, generator=g)
    tau = torch.arange(frames, dtype=torch.float32)[:, None] / FPS  # seconds, [T, 1]
    freq = law.freq0 * torch.exp(law.freq_map @ c)  # [64]
    amp = 0.4 + 0.8 * torch.sigmoid(law.amp_map @ c)
    phase = law.phase_map @ c + 2 * math.pi * torch.rand(1, generator=g)  # one random global phase per sample
    arg = 2 * math.pi * freq * tau + phase  # [T, 64]
    k = torch.arange(1, HARMONICS + 1, dtype=torch.float32)
    wave = (law.harmonics[None] * torch.sin(arg[..., None] * k)).sum(-1) / law.harmonics.norm(dim=-1)
    rate = 0.15 * torch.exp(law.env_map @ c)
    smooth = 0.65 + 0.35 * torch.sin(2 * math.pi * rate * tau + 2 * math.pi * torch.rand(1, generator=g))
    env = smooth.expand(frames, LATENT).clone()
    pulsed = law.pulse_period > 0
    if bool(pulsed.any()):
        period = law.pulse_period[pulsed]
        offset = torch.randint(0, 1000, (1,), generator=g).float()
        pos = torch.remainder(torch.arange(frames, dtype=torch.float32)[:, None] + offset, period)
        env[:, pulsed] = 0.25 + 0.9 * torch.exp(-pos / law.pulse_decay)
    latents = amp * wave * env + law.noise_std * torch.randn(frames, LATENT, generator=g)
    context = torch.cat([law.silence[:frames], torch.ones(frames, LATENT)], dim=-1)
    return Sample(name, latents.float(), torch.ones(frames), enc.float(), torch.ones(law.enc_len, dtype=torch.bool),
                  context.float(), metadata={"filename": f"{name}.wav", "caption": "synthetic", "lyrics": "[Instrumental]",
                                             "duration": frames / FPS, "is_instrumental": True})


def draw_samples(law: Law, count: int, seed: int, prefix: str, lengths=DEFAULT_LENGTHS) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        frames = lengths[int(torch.randint(len(lengths), (1,), generator=g))]
        out.append(draw_sample(law, frames, g, f"{prefix}_{i:03d}"))
    return out


def random_batch(law: Law, batch_size: int, g: torch.Generator, lengths=DEFAULT_LENGTHS) -> Batch:
    """A pretraining batch: fresh samples of one length (so no padding is needed)."""
    frames = lengths[int(torch.randint(len(lengths), (1,), generator=g))]
    return collate([draw_sample(law, frames, g, f"b{i}") for i in range(batch_size)])


def write_split(folder: Path, samples: list[Sample]) -> list[Path]:
    """Write samples as real `.pt` files (the keys of `sidestep.testing.tiny.write_dataset`)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in samples:
        path = folder / f"{s.name}.pt"
        torch.save({"target_latents": s.target_latents, "attention_mask": s.attention_mask,
                    "encoder_hidden_states": s.encoder_hidden_states, "encoder_attention_mask": s.encoder_attention_mask,
                    "context_latents": s.context_latents, "metadata": s.metadata}, path)
        paths.append(path)
    return paths
