"""Build tiny checkpoints of the REAL ACE-Step 1.5 architecture and datasets in the real `.pt` format.

Nothing here downloads anything: the model classes come from diffusers, the weights are seeded random.
Latent (64) and context (128) widths are the real ones; only the hidden sizes are small.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AceStepTransformer1DModel
from diffusers.pipelines.ace_step.modeling_ace_step import (
    AceStepAudioTokenDetokenizer,
    AceStepAudioTokenizer,
    AceStepConditionEncoder,
)
from safetensors.torch import save_file

from sidestep.models.convert import NULL_CONDITION_KEY, diffusers_key_to_original, diffusers_to_original
from sidestep.models.loading import transformer_kwargs
from sidestep.naming import ENCODER_PREFIX

__all__ = [
    "TINY_CONFIG",
    "tiny_config",
    "build_tiny_transformer",
    "build_tiny_condition_encoder",
    "build_tiny_audio_tokenizers",
    "write_original_checkpoint",
    "write_diffusers_checkpoint",
    "write_dataset",
    "LATENT_DIM",
    "CONTEXT_DIM",
]

LATENT_DIM = 64
CONTEXT_DIM = 128

# Field names are those of the original ACE-Step config.json, so the demo checkpoint reads like a real one.
# `auto_map` names ACE-Step's remote-code modules as its checkpoints do (turbo folders ship
# modeling_acestep_v15_turbo.py instead, see `tiny_config`); sidestep itself never runs that code.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["AceStepConditionGenerationModel"],
    "auto_map": {"AutoConfig": "configuration_acestep_v15.AceStepConfig",
                 "AutoModel": "modeling_acestep_v15_base.AceStepConditionGenerationModel"},
    "model_type": "acestep",
    "model_version": "base",
    "is_turbo": False,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "in_channels": LATENT_DIM + CONTEXT_DIM,
    "audio_acoustic_hidden_dim": LATENT_DIM,
    "patch_size": 2,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-6,
    "sliding_window": 8,
    "text_hidden_dim": 32,
    "timbre_hidden_dim": LATENT_DIM,
    "num_lyric_encoder_hidden_layers": 1,
    "num_timbre_encoder_hidden_layers": 1,
    "num_attention_pooler_hidden_layers": 1,  # the 5 Hz audio tokenizer and detokenizer
    "pool_window_size": 5,
    "fsq_input_levels": [8, 8, 8, 5, 5, 5],
    "vocab_size": 64003,  # 8·8·8·5·5·5 audio codes + 3
    "timestep_mu": -0.4,
    "timestep_sigma": 1.0,
    "data_proportion": 0.5,
    "dtype": "float32",
}


def tiny_config(num_layers: int = 4, hidden: int = 64, **overrides: Any) -> dict[str, Any]:
    """TINY_CONFIG with `num_layers` alternating sliding/full layers and the given hidden size."""
    cfg = dict(TINY_CONFIG, num_hidden_layers=num_layers, hidden_size=hidden, intermediate_size=2 * hidden)
    cfg["head_dim"] = max(8, hidden // cfg["num_attention_heads"])
    cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    cfg["fsq_dim"] = hidden
    cfg.update(overrides)
    if cfg.get("is_turbo"):
        cfg["auto_map"] = dict(cfg["auto_map"], AutoModel="modeling_acestep_v15_turbo.AceStepConditionGenerationModel")
    return cfg


def build_tiny_transformer(config: dict[str, Any] | None = None, seed: int = 0) -> AceStepTransformer1DModel:
    """A randomly initialised, seeded DiT of the real class."""
    torch.manual_seed(seed)
    return AceStepTransformer1DModel(**transformer_kwargs(config or tiny_config())).eval()


def build_tiny_condition_encoder(config: dict[str, Any], seed: int = 1) -> AceStepConditionEncoder:
    """The real condition encoder class at the tiny config's sizes (its width is the DiT's encoder width)."""
    torch.manual_seed(seed)
    return AceStepConditionEncoder(
        hidden_size=config.get("encoder_hidden_size") or config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        text_hidden_dim=config["text_hidden_dim"],
        timbre_hidden_dim=config["timbre_hidden_dim"],
        num_lyric_encoder_hidden_layers=config["num_lyric_encoder_hidden_layers"],
        num_timbre_encoder_hidden_layers=config["num_timbre_encoder_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        sliding_window=config["sliding_window"],
    ).eval()


def build_tiny_audio_tokenizers(config: dict[str, Any], seed: int = 2) -> dict[str, torch.nn.Module]:
    """The real 5 Hz audio tokenizer and detokenizer classes at the tiny sizes, keyed by their checkpoint prefix."""
    torch.manual_seed(seed)
    shared = dict(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                  audio_acoustic_hidden_dim=config["audio_acoustic_hidden_dim"],
                  pool_window_size=config["pool_window_size"],
                  num_attention_pooler_hidden_layers=config["num_attention_pooler_hidden_layers"],
                  num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
                  head_dim=config["head_dim"], sliding_window=config["sliding_window"])
    return {"tokenizer.": AceStepAudioTokenizer(fsq_dim=config["fsq_dim"], fsq_input_levels=config["fsq_input_levels"],
                                                **shared).eval(),
            "detokenizer.": AceStepAudioTokenDetokenizer(**shared).eval()}


def _silence_latent(seed: int, frames: int = 1500) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(1, LATENT_DIM, frames, generator=gen)  # stored channels-first, like the real file


def write_original_checkpoint(root: Path, config: dict[str, Any] | None = None, seed: int = 0,
                              folder: str = "acestep-v15-base", dtype: torch.dtype | None = None) -> Path:
    """Write `<root>/<folder>/` as ACE-Step ships it: config.json (with its auto_map), model.safetensors with every
    weight group (decoder., encoder., tokenizer., detokenizer., null_condition_emb) and silence_latent.pt.
    ACE-Step's remote-code .py files are not written. `dtype` casts the floating-point weights (the released
    checkpoints are bf16). Returns the model folder."""
    config = config or tiny_config()
    model_dir = Path(root) / folder
    model_dir.mkdir(parents=True, exist_ok=True)
    dit = build_tiny_transformer(config, seed)
    encoder = build_tiny_condition_encoder(config, seed + 1)
    tensors = {diffusers_key_to_original(k): v.contiguous() for k, v in dit.state_dict().items()}
    for key, value in encoder.state_dict().items():
        if key == NULL_CONDITION_KEY:
            tensors[NULL_CONDITION_KEY] = value.contiguous()
        elif key != "silence_latent":  # the original keeps silence in its own file
            tensors[ENCODER_PREFIX + diffusers_to_original(key)] = value.contiguous()
    for prefix, module in build_tiny_audio_tokenizers(config, seed + 2).items():
        tensors.update({prefix + diffusers_to_original(k): v.contiguous() for k, v in module.state_dict().items()})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.save(_silence_latent(seed), model_dir / "silence_latent.pt")
    return model_dir


def write_diffusers_checkpoint(root: Path, config: dict[str, Any] | None = None, seed: int = 0,
                               folder: str = "acestep-v15-base-diffusers") -> Path:
    """Write the same weights as `write_original_checkpoint` in the diffusers pipeline layout."""
    config = config or tiny_config()
    model_dir = Path(root) / folder
    dit = build_tiny_transformer(config, seed)
    encoder = build_tiny_condition_encoder(config, seed + 1)
    tokenizer, detokenizer = build_tiny_audio_tokenizers(config, seed + 2).values()
    dit.save_pretrained(model_dir / "transformer")
    encoder.save_pretrained(model_dir / "condition_encoder")
    tokenizer.save_pretrained(model_dir / "audio_tokenizer")
    detokenizer.save_pretrained(model_dir / "audio_token_detokenizer")
    index = {"_class_name": "AceStepPipeline", "transformer": ["diffusers", "AceStepTransformer1DModel"],
             "condition_encoder": ["diffusers", "AceStepConditionEncoder"],
             "audio_tokenizer": ["diffusers", "AceStepAudioTokenizer"],
             "audio_token_detokenizer": ["diffusers", "AceStepAudioTokenDetokenizer"]}
    (model_dir / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return model_dir


def _structured_latents(frames: int, gen: torch.Generator) -> torch.Tensor:
    """Per-channel sinusoid mixtures with an envelope: learnable structure, not white noise."""
    t = torch.arange(frames, dtype=torch.float32)[:, None] / 25.0
    freq = 0.2 + 2.0 * torch.rand(1, LATENT_DIM, generator=gen)
    phase = 2 * math.pi * torch.rand(1, LATENT_DIM, generator=gen)
    amp = 0.5 + torch.rand(1, LATENT_DIM, generator=gen)
    envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * 0.1 * t)
    noise = 0.1 * torch.randn(frames, LATENT_DIM, generator=gen)
    return amp * torch.sin(2 * math.pi * freq * t + phase) * envelope + noise


def write_dataset(folder: Path, count: int = 6, encoder_width: int = 64, seed: int = 0,
                  lengths: tuple[int, int] = (40, 96), encoder_length: int = 24,
                  dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write `count` samples in the real `.pt` format, with varying latent lengths. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    silence = _silence_latent(seed).transpose(1, 2)[0]
    paths = []
    for i in range(count):
        frames = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        valid = int(torch.randint(encoder_length // 2, encoder_length + 1, (1,), generator=gen))
        enc_mask = torch.zeros(encoder_length, dtype=torch.bool)
        enc_mask[:valid] = True
        sample = {
            "target_latents": _structured_latents(frames, gen).to(dtype),
            "attention_mask": torch.ones(frames, dtype=dtype),
            "encoder_hidden_states": torch.randn(encoder_length, encoder_width, generator=gen).to(dtype),
            "encoder_attention_mask": enc_mask,
            "context_latents": torch.cat([silence[:frames], torch.ones(frames, LATENT_DIM)], dim=-1).to(dtype),
            "metadata": {"filename": f"song_{i:02d}.wav", "caption": f"synthetic song {i}",
                         "lyrics": "[Instrumental]", "duration": frames / 25.0, "is_instrumental": True},
        }
        path = folder / f"song_{i:02d}.pt"
        torch.save(sample, path)
        paths.append(path)
    return paths
