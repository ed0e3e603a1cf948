"""`sidestep export`: one trained adapter, written for the loader the user has.

- `peft`: ACE-Step 1.5's own adapter folder (see saving.py), also what `sidestep train` writes.
- `diffusers`: one safetensors file as `AceStepLoraLoaderMixin.save_lora_weights` writes it: keys
  `transformer.<diffusers module>.lora_A.weight`, and the LoraConfig (per-module ranks AND alphas) in the
  `lora_adapter_metadata` header; without that header diffusers would take alpha = rank.
- `comfyui`: keys `diffusion_model.decoder.<original module>.lora_A.weight` / `.lora_B.weight` plus one
  `<module>.alpha` scalar per module, because ComfyUI applies alpha / rank only when that tensor exists.
A source may itself be any of the three, so formats round-trip. Both .safetensors formats also carry the run's
training facts under kohya's `ss_*` header keys (export_meta.py).
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sidestep.errors import CheckpointError, ConfigError
from sidestep.fileio import atomic_dir, atomic_path
from sidestep.models.convert import diffusers_to_original, original_to_diffusers
from sidestep.training import saving
from sidestep.training.adapters import AdapterPlan, peft_config
from sidestep.training.config import AdapterKind
from sidestep.training.export_meta import run_name, training_metadata

__all__ = ["ExportFormat", "LoraAdapter", "ExportResult", "export_adapter", "export_target", "read_lora", "adapter_source", "DIFFUSERS_WEIGHT_NAME",
           "COMFYUI_PREFIX", "DIFFUSERS_PREFIX"]

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
COMFYUI_WEIGHT_NAME = "adapter_comfyui.safetensors"  # the name older versions wrote; still read
COMFYUI_PREFIX = "diffusion_model.decoder."
DIFFUSERS_PREFIX = "transformer."
_METADATA_KEY = "lora_adapter_metadata"


class ExportFormat(str, Enum):
    COMFYUI = "comfyui"
    DIFFUSERS = "diffusers"
    PEFT = "peft"


@dataclass(frozen=True)
class LoraAdapter:
    """A plain LoRA in one canonical form: original module names, A [r, in], B [out, r], alpha per module."""

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alphas: dict[str, float]
    dropout: float = 0.0

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(a.shape[0]) for name, a in self.down.items()}

    def plan(self) -> AdapterPlan:
        ranks = self.ranks
        base_rank = collections.Counter(ranks.values()).most_common(1)[0][0]
        uniform = len(set(ranks.values())) == 1 and len({a / ranks[n] for n, a in self.alphas.items()}) == 1
        base_alpha = next(self.alphas[n] for n in ranks if ranks[n] == base_rank)
        return AdapterPlan(AdapterKind.LORA, ranks, dict(self.alphas), self.dropout, base_rank, base_alpha,
                           adaptive=not uniform)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: ExportFormat
    modules: int


def export_adapter(src: Path, dest: Path, fmt: ExportFormat | str, overwrite: bool = False) -> ExportResult:
    """Convert the adapter at `src` (a training output, adapter folder or exported file) into `fmt` at `dest`.

    A folder `dest` gets `<run name>.safetensors` for ComfyUI (its loras/ folder is flat: a fixed name would
    collide) and diffusers' own `pytorch_lora_weights.safetensors` (the name `load_lora_weights(folder)` looks for).
    """
    fmt = ExportFormat(fmt)
    src = _adapter_source(Path(src))
    if fmt is ExportFormat.PEFT and src.is_dir():  # any peft adapter (LoKr, DoRA, ...) copies as is
        saving.read_adapter_dir(src)  # validates it is an adapter folder
        return _copy_peft_dir(src, _target(Path(dest), None, overwrite))
    adapter = read_lora(src)
    if fmt is ExportFormat.PEFT:
        path = _target(Path(dest), None, overwrite)
        with atomic_dir(path) as tmp:
            _write_peft(tmp, adapter)
        return ExportResult(path, fmt, len(adapter.down))
    header = _read_safetensors(src)[1] if src.is_file() else {}
    meta = training_metadata(adapter.ranks, adapter.alphas, src, header)
    if fmt is ExportFormat.DIFFUSERS:
        path = _target(Path(dest), DIFFUSERS_WEIGHT_NAME, overwrite)
        _write_diffusers(path, adapter, meta)
    else:
        path = _target(Path(dest), f"{run_name(src)}.safetensors", overwrite)
        _write_comfyui(path, adapter, meta)
    return ExportResult(path, fmt, len(adapter.down))


def export_target(src: Path, dest: Path, fmt: ExportFormat | str) -> Path:
    """The path `export_adapter(src, dest, fmt)` writes: the wizard asks before replacing it."""
    fmt = ExportFormat(fmt)
    dest = Path(dest)
    if fmt is ExportFormat.PEFT or dest.suffix == ".safetensors":
        return dest
    name = DIFFUSERS_WEIGHT_NAME if fmt is ExportFormat.DIFFUSERS else f"{run_name(_adapter_source(Path(src)))}.safetensors"
    return dest / name


def read_lora(src: Path) -> LoraAdapter:
    """Read a LoRA from an ACE-Step/peft folder, a diffusers file or a ComfyUI file (detected by its keys)."""
    src = _adapter_source(Path(src))
    if src.is_dir():
        return _from_peft(saving.read_adapter_dir(src), src)
    tensors, header = _read_safetensors(src)
    if any(k.startswith(DIFFUSERS_PREFIX) for k in tensors):
        return _from_diffusers(tensors, header, src)
    if any(k.startswith(saving.PEFT_PREFIX) for k in tensors) and (src.parent / saving.ADAPTER_CONFIG).is_file():
        return _from_peft(saving.read_adapter_dir(src.parent), src.parent)
    return _from_comfyui(tensors, src)


# ---- readers -------------------------------------------------------------------------------------------


def _from_peft(files: saving.AdapterFiles, src: Path) -> LoraAdapter:
    cfg = files.config
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        kind = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type")
        raise ConfigError(f"{src} holds a {kind} adapter; only plain LoRA exports to comfyui/diffusers "
                          "(use --format peft for this one).")
    down, up = _pairs({k.removeprefix(saving.PEFT_PREFIX): v for k, v in files.tensors.items()},
                      ("lora_A", "lora_B"), src)
    return LoraAdapter(down, up, _alphas(cfg, list(down)), float(cfg.get("lora_dropout") or 0.0))


def _from_diffusers(tensors: dict[str, torch.Tensor], header: dict[str, str], src: Path) -> LoraAdapter:
    raw = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in tensors.items() if k.startswith(DIFFUSERS_PREFIX)}
    down_d, up_d = _pairs(raw, ("lora_A", "lora_B"), src)
    try:
        meta = json.loads(header[_METADATA_KEY]) if _METADATA_KEY in header else {}
    except (ValueError, RecursionError):
        raise CheckpointError(f"{src}: its '{_METADATA_KEY}' header is not valid JSON.") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{src}: its '{_METADATA_KEY}' header is not a JSON object.")
    cfg = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in meta.items() if k.startswith(DIFFUSERS_PREFIX)}
    alphas_d = _alphas(cfg, list(down_d)) if cfg else {n: float(a.shape[0]) for n, a in down_d.items()}
    name = diffusers_to_original
    return LoraAdapter({name(n): t for n, t in down_d.items()}, {name(n): t for n, t in up_d.items()},
                       {name(n): a for n, a in alphas_d.items()}, float(cfg.get("lora_dropout") or 0.0))


def _from_comfyui(tensors: dict[str, torch.Tensor], src: Path) -> LoraAdapter:
    raw: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        stripped = key.removeprefix(COMFYUI_PREFIX).removeprefix(saving.PEFT_PREFIX)
        stripped = stripped.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
        if stripped.endswith(".alpha"):
            alphas[stripped[: -len(".alpha")]] = float(value.float().item())
        else:
            raw[stripped] = value
    down, up = _pairs(raw, ("lora_A", "lora_B"), src)
    # ComfyUI's rule: no alpha tensor means scale 1.0, i.e. alpha = rank.
    return LoraAdapter(down, up, {n: alphas.get(n, float(a.shape[0])) for n, a in down.items()})


def _pairs(raw: dict[str, torch.Tensor], names: tuple[str, str], src: Path) -> tuple[dict, dict]:
    down: dict[str, torch.Tensor] = {}
    up: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        for part, bucket in zip(names, (down, up)):
            marker = f".{part}.weight"
            if key.endswith(marker):
                bucket[key[: -len(marker)]] = value
                break
        else:
            raise CheckpointError(f"{src}: unexpected key {key!r} (not a LoRA A/B weight).")
    if not down or set(down) != set(up):
        odd = sorted(set(down) ^ set(up))[:1] or ["(no LoRA weights)"]
        raise CheckpointError(f"{src}: LoRA A and B weights do not pair up (e.g. {odd[0]}).")
    return down, up


def _alphas(cfg: dict[str, Any], modules: list[str]) -> dict[str, float]:
    """Per-module alpha with peft's own rule: the first alpha_pattern key matching the name's end, else lora_alpha."""
    pattern = cfg.get("alpha_pattern") or {}
    default = float(cfg.get("lora_alpha", 8))
    out = {}
    for name in modules:
        key = get_pattern_key(list(pattern), name)
        out[name] = float(pattern.get(key, default))
    return out


# ---- writers -------------------------------------------------------------------------------------------


def _write_peft(folder: Path, adapter: LoraAdapter) -> None:
    tensors = {}
    for name in adapter.down:
        tensors[f"{saving.PEFT_PREFIX}{name}.lora_A.weight"] = adapter.down[name].contiguous()
        tensors[f"{saving.PEFT_PREFIX}{name}.lora_B.weight"] = adapter.up[name].contiguous()
    (folder / saving.ADAPTER_CONFIG).write_text(json.dumps(saving.ace_step_config(adapter.plan()), indent=2) + "\n",
                                                encoding="utf-8")
    save_file(tensors, str(folder / saving.ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _write_diffusers(path: Path, adapter: LoraAdapter, meta: dict[str, str]) -> None:
    from diffusers.loaders import AceStepLoraLoaderMixin  # the writer diffusers itself uses

    layers = {}
    for name in adapter.down:
        module = original_to_diffusers(name)
        layers[f"{module}.lora_A.weight"] = adapter.down[name].contiguous()
        layers[f"{module}.lora_B.weight"] = adapter.up[name].contiguous()
    metadata = peft_config(adapter.plan(), "diffusers").to_dict()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, atomic_path(path) as partial:
        AceStepLoraLoaderMixin.save_lora_weights(tmp, transformer_lora_layers=layers,
                                                 transformer_lora_adapter_metadata=metadata,
                                                 weight_name=DIFFUSERS_WEIGHT_NAME)
        written = Path(tmp) / DIFFUSERS_WEIGHT_NAME
        # diffusers' writer takes no extra header: add the training facts beside its own lora_adapter_metadata
        tensors, header = _read_safetensors(written)
        save_file(tensors, str(partial), metadata={**meta, **header})


def _write_comfyui(path: Path, adapter: LoraAdapter, meta: dict[str, str]) -> None:
    tensors = {}
    for name in adapter.down:
        tensors[f"{COMFYUI_PREFIX}{name}.lora_A.weight"] = adapter.down[name].contiguous()
        tensors[f"{COMFYUI_PREFIX}{name}.lora_B.weight"] = adapter.up[name].contiguous()
        tensors[f"{COMFYUI_PREFIX}{name}.alpha"] = torch.tensor(float(adapter.alphas[name]))
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata={**meta, "format": "pt"})


def _copy_peft_dir(src: Path, dest: Path) -> ExportResult:
    with atomic_dir(dest) as tmp:
        for name in (saving.ADAPTER_CONFIG, saving.ADAPTER_WEIGHTS):
            shutil.copy2(src / name, tmp / name)
    with safe_open(str(dest / saving.ADAPTER_WEIGHTS), framework="pt") as handle:
        modules = {k.split(".lora_")[0].split(".hada_")[0].split(".lokr_")[0] for k in handle.keys()}
    return ExportResult(dest, ExportFormat.PEFT, len(modules))


# ---- paths ---------------------------------------------------------------------------------------------


def adapter_source(src: Path) -> Path:
    """The adapter folder or file that `src` names (see `_adapter_source`); a CheckpointError if none."""
    return _adapter_source(Path(src))


def _adapter_source(src: Path) -> Path:
    """A training output folder means its `final/`; a folder with only a diffusers file means that file."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist; give an adapter folder, a training output folder or a .safetensors file.")
    if src.is_dir() and not (src / saving.ADAPTER_CONFIG).is_file():
        if (src / "final" / saving.ADAPTER_CONFIG).is_file():
            return src / "final"
        for name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
            if (src / name).is_file():
                return src / name
        files = sorted(src.glob("*.safetensors"))
        if len(files) == 1:  # a folder an export wrote `<run name>.safetensors` into
            return files[0]
        if len(files) > 1:
            raise CheckpointError(f"{src} holds {len(files)} .safetensors files; name the one to use.")
        raise CheckpointError(f"{src} holds no adapter ({saving.ADAPTER_CONFIG} or a .safetensors LoRA).")
    return src


def _target(dest: Path, default_name: str | None, overwrite: bool) -> Path:
    if default_name is not None and dest.suffix != ".safetensors":
        dest = dest / default_name
    if dest.exists() and not overwrite:
        raise ConfigError(f"{dest} already exists; pass --overwrite to replace it or choose another destination.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({err}).") from err
