"""Read, validate and batch preprocessed samples (`.pt` dicts, or `.safetensors` twins).

Every problem becomes one DatasetError sentence naming the file; nothing here touches a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from sidestep.errors import DatasetError, SidestepError

__all__ = [
    "REQUIRED_KEYS",
    "DatasetSpec",
    "Sample",
    "Batch",
    "DatasetScan",
    "EmptySample",
    "load_pt",
    "load_sample",
    "scan_dataset",
    "sample_files",
    "collate",
    "dataset_hash",
    "content_hash",
]

REQUIRED_KEYS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "context_latents")
_FLOAT_KEYS = ("target_latents", "encoder_hidden_states", "context_latents")
_IGNORED_SUFFIXES = (".tmp.pt", ".partial")
_MASK_KEYS = ("attention_mask", "encoder_attention_mask")
# VAE latents stay within tens and encoder states within hundreds; beyond these a file is broken (fp16 tops out at 65504)
_MAX_ABS = {"target_latents": 1e4, "context_latents": 1e4, "encoder_hidden_states": 6e4}


class EmptySample(DatasetError):
    """A readable sample whose attention mask is all zero: skipped with a warning, never trained on."""


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """Widths a sample must have; `encoder_dim` None accepts any width (consistent across files)."""

    latent_dim: int = 64
    context_dim: int = 128
    encoder_dim: int | None = None

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> "DatasetSpec":
        latent = int(config.get("audio_acoustic_hidden_dim", 64))
        return cls(latent, int(config.get("in_channels", latent + 128)) - latent,
                   int(config.get("encoder_hidden_size") or config.get("hidden_size", 2048)))


@dataclass(frozen=True)
class Sample:
    """One preprocessed song or chunk. Shapes: latents [T, 64], context [T, 128], encoder [L, D]."""

    name: str
    target_latents: torch.Tensor
    attention_mask: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor
    context_latents: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.target_latents.shape[0])

    def crop(self, start: int, length: int) -> "Sample":
        """A window of `length` latent frames from `start`; the condition is kept whole."""
        end = start + length
        return Sample(self.name, self.target_latents[start:end], self.attention_mask[start:end],
                      self.encoder_hidden_states, self.encoder_attention_mask, self.context_latents[start:end],
                      self.metadata, self.extra)


@dataclass
class Batch:
    """Samples stacked with a leading batch dimension (right-padded with zeros when lengths differ)."""

    names: list[str]
    target_latents: torch.Tensor  # [B, T, 64]
    attention_mask: torch.Tensor  # [B, T]
    encoder_hidden_states: torch.Tensor  # [B, L, D]
    encoder_attention_mask: torch.Tensor  # [B, L]
    context_latents: torch.Tensor  # [B, T, 128]

    @property
    def size(self) -> int:
        return len(self.names)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Batch":
        return Batch(self.names, self.target_latents.to(device, dtype), self.attention_mask.to(device, dtype),
                     self.encoder_hidden_states.to(device, dtype), self.encoder_attention_mask.to(device),
                     self.context_latents.to(device, dtype))


@dataclass(frozen=True)
class DatasetScan:
    """The usable files of a folder and, with skip_bad, the ones left out and why."""

    folder: Path
    files: tuple[Path, ...]
    problems: tuple[str, ...] = ()
    encoder_dim: int | None = None
    total_frames: int = 0


def sample_files(folder: Path) -> list[Path]:
    """The sample files of a folder, sorted; a `.safetensors` twin is used only when no `.pt` exists.

    Dot-files (macOS `._x.pt`, our own `.x.partial` temp files) and the init bases analysis writes are not samples.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder {folder} does not exist or is not a folder.")
    pts = {p.stem: p for p in _candidates(folder, "*.pt") if not p.name.endswith(_IGNORED_SUFFIXES)}
    for twin in _candidates(folder, "*.safetensors"):
        if twin.stem not in pts and not twin.name.startswith("fisher_init") and not _is_init_file(twin):
            pts[twin.stem] = twin
    if not pts:
        raise DatasetError(f"Dataset folder {folder} has no .pt files; run `sidestep preprocess` first.")
    return [pts[k] for k in sorted(pts)]


def _candidates(folder: Path, pattern: str) -> list[Path]:
    found = []
    for path in folder.glob(pattern):
        if path.name.startswith("."):
            continue
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            shown = repr(os.fsencode(path.name))[2:-1]  # the raw bytes, e.g. bad\xff.pt
            raise DatasetError(f"The file name {shown} in {folder} is not valid UTF-8; rename it "
                               "(or move it out of the folder).") from None
        found.append(path)
    return found


def _is_init_file(path: Path) -> bool:
    """The gradient-init bases of `sidestep analyze --output NAME.json` (NAME_init.safetensors), by their header."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return "sidestep" in (handle.metadata() or {})
    except (SafetensorError, OSError):
        return False  # an unreadable twin is reported when it is read as a sample


def load_pt(path: Path, unreadable: Callable[[Exception], SidestepError], mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` on the CPU; any failure becomes the caller's one-sentence error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load raises a dozen unrelated types on corrupt input; all mean "unreadable"
        raise unreadable(err) from err


def _read_raw(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                raw: dict[str, Any] = {k: handle.get_tensor(k) for k in handle.keys()}
                header = handle.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise DatasetError(f"{path.name}: cannot read this .safetensors file ({err}).") from err
        try:
            raw["metadata"] = json.loads(header["metadata"]) if "metadata" in header else {}
        except (ValueError, RecursionError) as err:
            raise DatasetError(f"{path.name}: its 'metadata' header is not valid JSON ({str(err)[:80]}); "
                               "rerun `sidestep preprocess` for it.") from None
        return raw
    def unreadable(err: Exception) -> DatasetError:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        return DatasetError(f"{path.name}: cannot read this .pt file (corrupt, truncated or not a tensor file: {reason}).")

    raw = load_pt(path, unreadable)
    if not isinstance(raw, dict):
        raise DatasetError(f"{path.name}: expected a dict of tensors, found {type(raw).__name__}.")
    return raw


def load_sample(path: Path, spec: DatasetSpec = DatasetSpec()) -> Sample:
    """Read and validate one sample file (always `weights_only=True`)."""
    path = Path(path)
    raw = _read_raw(path)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        hint = " (an interrupted preprocessing staging file? rerun preprocessing)" if "target_latents" in raw else ""
        raise DatasetError(f"{path.name}: missing key {', '.join(repr(k) for k in missing)}{hint}.")
    for key in REQUIRED_KEYS:
        if not isinstance(raw[key], torch.Tensor):
            raise DatasetError(f"{path.name}: {key!r} is a {type(raw[key]).__name__}, not a tensor.")
    _check_shapes(path.name, raw, spec)
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    extra = {k: v for k, v in raw.items() if k not in REQUIRED_KEYS and k != "metadata"}
    return Sample(path.stem, *(raw[k] for k in REQUIRED_KEYS), metadata=metadata, extra=extra)


def _check_shapes(name: str, raw: dict[str, Any], spec: DatasetSpec) -> None:
    lat, ctx, enc = raw["target_latents"], raw["context_latents"], raw["encoder_hidden_states"]
    expect = {"target_latents": 2, "attention_mask": 1, "encoder_hidden_states": 2,
              "encoder_attention_mask": 1, "context_latents": 2}
    for key, ndim in expect.items():
        if raw[key].dim() != ndim:
            raise DatasetError(f"{name}: {key!r} has shape {list(raw[key].shape)}, expected {ndim} dimensions.")
    for key in _FLOAT_KEYS:
        if not raw[key].is_floating_point():
            raise DatasetError(f"{name}: {key!r} has dtype {raw[key].dtype}, expected a floating-point tensor.")
        if not torch.isfinite(raw[key]).all():
            raise DatasetError(f"{name}: {key!r} contains NaN or Inf values.")
        peak = float(raw[key].abs().max()) if raw[key].numel() else 0.0
        if peak > _MAX_ABS[key]:
            raise DatasetError(f"{name}: {key!r} reaches {peak:.3g}, far beyond what preprocessing produces "
                               f"(|x| < {_MAX_ABS[key]:g}); rerun `sidestep preprocess` for it.")
    for key in _MASK_KEYS:
        mask = raw[key]
        if mask.is_floating_point() and not torch.isfinite(mask).all():
            raise DatasetError(f"{name}: {key!r} contains NaN or Inf values.")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise DatasetError(f"{name}: {key!r} holds values other than 0 and 1.")
    if lat.shape[1] != spec.latent_dim:
        raise DatasetError(f"{name}: 'target_latents' is {lat.shape[1]} wide, expected {spec.latent_dim}.")
    if ctx.shape[1] != spec.context_dim:
        raise DatasetError(f"{name}: 'context_latents' is {ctx.shape[1]} wide, expected {spec.context_dim}.")
    if spec.encoder_dim is not None and enc.shape[1] != spec.encoder_dim:
        raise DatasetError(f"{name}: 'encoder_hidden_states' is {enc.shape[1]} wide, the model expects {spec.encoder_dim}.")
    frames = lat.shape[0]
    if frames == 0:
        raise DatasetError(f"{name}: 'target_latents' has no frames.")
    if ctx.shape[0] != frames or raw["attention_mask"].shape[0] != frames:
        raise DatasetError(f"{name}: lengths differ: target_latents {frames} frames, context_latents "
                           f"{ctx.shape[0]}, attention_mask {raw['attention_mask'].shape[0]}.")
    if raw["encoder_attention_mask"].shape[0] != enc.shape[0]:
        raise DatasetError(f"{name}: encoder_hidden_states has {enc.shape[0]} rows but encoder_attention_mask "
                           f"{raw['encoder_attention_mask'].shape[0]}.")
    if enc.shape[0] == 0 or not bool(raw["encoder_attention_mask"].any()):
        raise DatasetError(f"{name}: the condition is empty ('encoder_hidden_states' has no unmasked rows); "
                           "rerun `sidestep preprocess` for it.")
    if not bool(raw["attention_mask"].any()):
        raise EmptySample(f"{name}: 'attention_mask' is all zero, so it has nothing to learn from.")


def scan_dataset(folder: Path, spec: DatasetSpec = DatasetSpec(), skip_bad: bool = False) -> DatasetScan:
    """Validate every sample of `folder` before any model is loaded; with skip_bad, report instead of failing."""
    good: list[Path] = []
    problems: list[str] = []
    widths: dict[int, str] = {}
    frames = 0
    for path in sample_files(folder):
        try:
            sample = load_sample(path, spec)
            width = int(sample.encoder_hidden_states.shape[1])
            if widths and width not in widths:
                first_width, first_name = next(iter(widths.items()))
                raise DatasetError(f"{path.name}: 'encoder_hidden_states' is {width} wide but {first_name} is {first_width}.")
        except DatasetError as err:
            if not skip_bad and not isinstance(err, EmptySample):
                raise
            problems.append(str(err))
            continue
        widths.setdefault(width, path.name)
        frames += sample.length
        good.append(path)
    if not good:
        raise DatasetError(f"Dataset folder {folder} has no usable samples ({len(problems)} bad files were skipped, "
                           f"e.g. {problems[0].rstrip('.')}).")
    return DatasetScan(Path(folder), tuple(good), tuple(problems), next(iter(widths)), frames)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples; unequal lengths are right-padded with zeros (batch size 1 is exact, see docs/checkpoints.md)."""
    t_max = max(s.length for s in samples)
    l_max = max(int(s.encoder_hidden_states.shape[0]) for s in samples)

    def pad(x: torch.Tensor, n: int) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, n - x.shape[0])) if x.dim() == 2 else F.pad(x, (0, n - x.shape[0]))

    dtype = samples[0].target_latents.dtype
    return Batch(
        [s.name for s in samples],
        torch.stack([pad(s.target_latents, t_max) for s in samples]),
        torch.stack([pad(s.attention_mask.to(dtype), t_max) for s in samples]),
        torch.stack([pad(s.encoder_hidden_states, l_max) for s in samples]),
        torch.stack([pad(s.encoder_attention_mask.bool(), l_max) for s in samples]),
        torch.stack([pad(s.context_latents, t_max) for s in samples]),
    )


def dataset_hash(folder: Path) -> str:
    """The reference tool's fingerprint: md5 of sorted `name:size` of the `.pt` files joined by '|', 12 hex chars."""
    files = sorted(p for p in Path(folder).glob("*.pt") if not p.name.endswith(_IGNORED_SUFFIXES))
    text = "|".join(f"{p.name}:{p.stat().st_size}" for p in files)
    return hashlib.md5(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def content_hash(files: Iterable[Path]) -> str:
    """A stronger fingerprint: sha256 over names and bytes of the sample files, 16 hex chars."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in files):
        digest.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as fh:  # file_digest streams into the running digest it is handed
            hashlib.file_digest(fh, lambda: digest)
    return digest.hexdigest()[:16]
