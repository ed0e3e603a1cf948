"""The frozen models that turn audio and text into training tensors, loaded once from a checkpoint root.

- VAE: diffusers `AutoencoderOobleck` from `<root>/vae` (or `<model>/vae` in the diffusers layout).
- Text encoder + tokenizer: transformers `AutoModel`/`AutoTokenizer` from `<root>/Qwen3-Embedding-0.6B`
  (or `<model>/text_encoder` + `<model>/tokenizer`), local files only.
- Condition encoder: diffusers `AceStepConditionEncoder`, built from the model's config and loaded
  strictly from the original `model.safetensors` (`encoder.*` + `null_condition_emb`) or from the
  diffusers `condition_encoder/` folder. `silence_latent.pt` ([1, 64, frames], channels first) is kept
  beside it as `[frames, 64]`.

How each tensor is produced follows docs/checkpoints.md and diffusers' `AceStepPipeline.encode_prompt`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderOobleck
from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder

from sidestep.data.dataset import load_pt
from sidestep.errors import CheckpointError, ConfigError
from sidestep.models.convert import NULL_CONDITION_KEY, original_to_diffusers
from sidestep.models.device import Runtime
from sidestep.models.discovery import Layout, ModelEntry, read_config
from sidestep.models.loading import check_weight_keys, iter_tensors
from sidestep.naming import ENCODER_PREFIX

__all__ = [
    "Encoders", "load_encoders", "require_encoder_files", "vae_geometry", "encode_audio", "encode_condition", "context_latents",
    "TEXT_MAX_LENGTH", "LYRIC_MAX_LENGTH", "TEXT_ENCODER_FOLDER",
]

TEXT_MAX_LENGTH = 256  # caption prompt tokens (padding="max_length")
LYRIC_MAX_LENGTH = 512  # lyric tokens for training (the inference handler uses up to 2048)
TEXT_ENCODER_FOLDER = "Qwen3-Embedding-0.6B"
SILENCE_FILE = "silence_latent.pt"
_SILENCE_KEY = "silence_latent"


@dataclass(frozen=True)
class Encoders:
    """Everything preprocessing runs, on `runtime.device`; the VAE stays fp32 (latent quality, small model)."""

    vae: AutoencoderOobleck
    tokenizer: Any
    text_encoder: torch.nn.Module
    condition_encoder: AceStepConditionEncoder
    silence_latent: torch.Tensor  # [frames, 64], fp32, CPU
    runtime: Runtime

    @property
    def sample_rate(self) -> int:
        return int(self.vae.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        return int(np.prod(self.vae.config.downsampling_ratios))

    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop_length


def load_encoders(entry: ModelEntry, checkpoint_dir: Path, runtime: Runtime) -> Encoders:
    """Load the VAE, text encoder, tokenizer and condition encoder for `entry` (frozen, eval mode)."""
    root = Path(checkpoint_dir)
    with _quiet_hub_libraries():
        vae = _load_vae(_first_dir(root / "vae", entry.path / "vae", what="VAE"))
        text_dir = _first_dir(root / TEXT_ENCODER_FOLDER, entry.path / "text_encoder", what="text encoder")
        tokenizer = _load_tokenizer(entry.path / "tokenizer" if text_dir.name == "text_encoder" else text_dir)
        text_encoder = _load_text_encoder(text_dir, runtime)
        condition, silence = _load_condition_encoder(entry, root)
        vae = vae.to(runtime.device, torch.float32).requires_grad_(False).eval()
        condition = condition.to(runtime.device, runtime.dtype).requires_grad_(False).eval()
    return Encoders(vae, tokenizer, text_encoder, condition, silence, runtime)


def require_encoder_files(entry: ModelEntry, checkpoint_dir: Path) -> None:
    """A CheckpointError naming what is missing when the VAE, text encoder or condition encoder is absent;
    reads only folder listings and config.json, so it runs before any model loads."""
    root = Path(checkpoint_dir)
    _first_dir(root / "vae", entry.path / "vae", what="VAE")
    _first_dir(root / TEXT_ENCODER_FOLDER, entry.path / "text_encoder", what="text encoder")
    if entry.layout is Layout.DIFFUSERS and not (entry.path / "condition_encoder" / "config.json").is_file():
        raise CheckpointError(f"{entry.path}: no condition_encoder/config.json; rendering needs the condition encoder.")


def vae_geometry(entry: ModelEntry, checkpoint_dir: Path) -> tuple[int, int]:
    """(sample rate, hop length) from the VAE's config.json alone, so audio can be checked before any model loads."""
    folder = _first_dir(Path(checkpoint_dir) / "vae", entry.path / "vae", what="VAE")
    config = read_config(folder / "config.json")
    try:
        return int(config["sampling_rate"]), int(np.prod(config["downsampling_ratios"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: no usable sampling_rate/downsampling_ratios ({err}).") from err


def encode_audio(encoders: Encoders, samples: np.ndarray, generator: torch.Generator,
                 tile_seconds: float = 30.0, overlap_seconds: float = 2.0) -> torch.Tensor:
    """VAE latents of stereo audio: a *sample* of the posterior (not its mean), as fp32 `[T, 64]` on CPU.

    Args:
        samples (`np.ndarray` of shape `(2, n)`): audio at `encoders.sample_rate`.
        generator (`torch.Generator`): CPU generator for the posterior sample.
        tile_seconds / overlap_seconds: audio longer than one tile is encoded in tiles of `tile_seconds`
            whose `overlap_seconds` at each inner edge are encoded and discarded (diffusers' tiling,
            with both lengths rounded to whole latent frames so no frame is lost or duplicated).
    """
    vae, hop, rate = encoders.vae, encoders.hop_length, encoders.sample_rate
    tile = max(1, round(tile_seconds * rate / hop)) * hop
    overlap = round(overlap_seconds * rate / hop) * hop
    if tile <= 2 * overlap:
        raise ConfigError(f"VAE tile of {tile_seconds} s must be longer than twice its {overlap_seconds} s overlap.")
    vae.use_tiling = True
    vae.tile_sample_min_length, vae.tile_sample_overlap = tile, overlap
    audio = torch.from_numpy(np.ascontiguousarray(samples)).to(encoders.runtime.device, torch.float32)[None]
    with torch.no_grad():
        latents = vae.encode(audio).latent_dist.sample(generator=generator)
    return latents[0].transpose(0, 1).float().cpu().contiguous()


def encode_condition(encoders: Encoders, prompt: str, lyrics: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed cross-attention condition for one sample.

    The prompt goes through the whole text encoder (`last_hidden_state`, 256 tokens); the lyrics only
    through its token embeddings (512 tokens); the timbre reference is one zero frame (text-to-music
    training, no reference audio). The condition encoder packs lyrics + timbre + text with valid rows
    first. Returns `encoder_hidden_states` `[L, D]` (L = 512 + 1 + 256) and `encoder_attention_mask` `[L]` bool.
    """
    device, dtype = encoders.runtime.device, encoders.runtime.dtype
    text_ids, text_mask = _tokenize(encoders.tokenizer, prompt, TEXT_MAX_LENGTH, device)
    lyric_ids, lyric_mask = _tokenize(encoders.tokenizer, lyrics, LYRIC_MAX_LENGTH, device)
    timbre_dim = int(encoders.condition_encoder.config.timbre_hidden_dim)
    with torch.no_grad():
        # Like the pipeline: no attention mask, right padding, so the causal model's valid rows are exact.
        text_states = encoders.text_encoder(input_ids=text_ids).last_hidden_state.to(dtype)
        lyric_states = encoders.text_encoder.get_input_embeddings()(lyric_ids).to(dtype)
        states, mask = encoders.condition_encoder(
            text_hidden_states=text_states,
            text_attention_mask=text_mask,
            lyric_hidden_states=lyric_states,
            lyric_attention_mask=lyric_mask,
            refer_audio_acoustic_hidden_states_packed=torch.zeros(1, 1, timbre_dim, device=device, dtype=dtype),
            refer_audio_order_mask=torch.zeros(1, dtype=torch.long, device=device),
        )
    return states[0].cpu().contiguous(), mask[0].bool().cpu()


def context_latents(encoders: Encoders, frames: int) -> torch.Tensor:
    """`[frames, 128]`: the silence latent (tiled when the audio is longer) ‖ a chunk mask of ones."""
    silence = encoders.silence_latent
    if silence.shape[0] < frames:
        silence = silence.repeat(-(-frames // silence.shape[0]), 1)
    return torch.cat([silence[:frames], torch.ones(frames, silence.shape[1])], dim=-1)


def _tokenize(tokenizer: Any, text: str, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer([text], padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt", padding_side="right")
    return enc.input_ids.to(device), enc.attention_mask.to(device).bool()


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_hub_libraries() -> Iterator[None]:
    """Library code never prints: silence transformers/diffusers progress bars and info logs while loading."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = (tlog.get_verbosity(), dlog.get_verbosity(), tlog.is_progress_bar_enabled())
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # diffusers' Oobleck VAE still uses torch's deprecated weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        tlog.set_verbosity(saved[0])
        dlog.set_verbosity(saved[1])
        if saved[2]:
            tlog.enable_progress_bar()


def _first_dir(*candidates: Path, what: str) -> Path:
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(f"No {what} found: looked for {candidates[0]} (and {candidates[1]}); "
                          "download the ACE-Step checkpoints or pass --checkpoint-dir.")


def _load_vae(folder: Path) -> AutoencoderOobleck:
    try:
        vae, info = AutoencoderOobleck.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                       torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: cannot load the VAE ({str(err).splitlines()[0][:160]}).") from err
    check_weight_keys(folder, "the model's config.json", info.get("missing_keys"), info.get("unexpected_keys"),
                      info.get("mismatched_keys"))
    return vae


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({str(err).splitlines()[0][:160]}).") from err


def _load_text_encoder(folder: Path, runtime: Runtime) -> torch.nn.Module:
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(folder, local_files_only=True, dtype=runtime.dtype,
                                                output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{folder}: cannot load the text encoder ({str(err).splitlines()[0][:160]}).") from err
    check_weight_keys(folder, "the model's config.json", info.get("missing_keys"), info.get("unexpected_keys"),
                      info.get("mismatched_keys"))
    return model.to(runtime.device).requires_grad_(False).eval()


def _condition_config(config: dict[str, Any]) -> dict[str, Any]:
    """AceStepConditionEncoder arguments from an original config.json (as diffusers' converter builds them)."""
    keys = ("intermediate_size", "text_hidden_dim", "timbre_hidden_dim", "num_lyric_encoder_hidden_layers",
            "num_timbre_encoder_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rope_theta", "attention_bias", "attention_dropout", "rms_norm_eps", "sliding_window")
    kwargs = {k: config[k] for k in keys if k in config}
    kwargs["hidden_size"] = config.get("encoder_hidden_size") or config["hidden_size"]  # XL: 2048-wide encoder
    return kwargs


def _load_condition_encoder(entry: ModelEntry, root: Path) -> tuple[AceStepConditionEncoder, torch.Tensor]:
    # Not from_pretrained for the diffusers layout: one path for both layouts, since ACE-Step's own has no diffusers
    # loader and both need the same silence-latent fallback and key check.
    if entry.layout is Layout.DIFFUSERS:
        folder = entry.path / "condition_encoder"
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{entry.path}: no condition_encoder/config.json; "
                                  "preprocessing needs the condition encoder.")
        kwargs = {k: v for k, v in read_config(folder / "config.json").items() if not k.startswith("_")}
        state = _read_tensors(folder, "diffusion_pytorch_model", lambda key: key)
    else:
        kwargs = _condition_config(entry.config)
        state = _read_tensors(entry.path, "model", _original_encoder_key)
    silence = state.pop(_SILENCE_KEY, None)
    silence = _silence_latent(entry, root) if silence is None or not silence.abs().any() else silence[0]
    try:
        with torch.device("meta"):
            model = AceStepConditionEncoder(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{entry.path}: cannot build the condition encoder from its config ({err}).") from err
    expected = {k: v for k, v in model.state_dict().items() if k != _SILENCE_KEY}
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    check_weight_keys(entry.path, "the model's config.json", set(expected) - set(state), set(state) - set(expected),
                      mismatched)
    model.load_state_dict(state, strict=False, assign=True)
    # The pipeline slices this buffer for timbre at inference; keep it real (not meta) so .to() works.
    model.register_buffer(_SILENCE_KEY, silence[None].clone(), persistent=True)
    return model, silence.float().contiguous()


def _original_encoder_key(key: str) -> str | None:
    if key == NULL_CONDITION_KEY:
        return key
    if key.startswith(ENCODER_PREFIX):
        return original_to_diffusers(key[len(ENCODER_PREFIX):])
    return None  # decoder.*, tokenizer.*, detokenizer.*


def _read_tensors(folder: Path, stem: str, rename: Any) -> dict[str, torch.Tensor]:
    """The tensors of `folder/<stem>.safetensors` (or its shards) whose renamed key is not None."""
    state: dict[str, torch.Tensor] = {}
    for key, loader in iter_tensors(folder, stem):
        target = rename(key)
        if target is None:
            continue
        if target in state:
            raise CheckpointError(f"{folder}: key {key!r} maps onto {target!r}, which another key already filled.")
        state[target] = loader()
    return state


def _silence_latent(entry: ModelEntry, root: Path) -> torch.Tensor:
    """`[frames, 64]` from the model folder's (or the root's) silence_latent.pt, stored `[1, 64, frames]`."""
    for path in (entry.path / SILENCE_FILE, root / SILENCE_FILE):
        if path.is_file():
            raw = load_pt(path, lambda err, p=path: CheckpointError(
                f"{p}: cannot read the silence latent ({type(err).__name__})."))
            if not isinstance(raw, torch.Tensor) or raw.dim() != 3 or raw.shape[0] != 1:
                raise CheckpointError(f"{path}: expected a [1, 64, frames] tensor.")
            return raw[0].transpose(0, 1).float().contiguous()
    raise CheckpointError(f"No {SILENCE_FILE} in {entry.path} or {root}; it ships with every ACE-Step model.")
