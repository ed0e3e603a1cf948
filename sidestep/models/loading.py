"""Load a checkpoint's DiT into diffusers' AceStepTransformer1DModel, from either layout, strictly.

The diffusers layout goes through `from_pretrained(subfolder="transformer")`; ACE-Step's own layout, which diffusers
cannot read, through the key renames of `models.convert`. Both first compare names and shapes from the file headers.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from diffusers import AceStepTransformer1DModel
from safetensors import SafetensorError, safe_open

from sidestep.errors import CheckpointError
from sidestep.models.convert import NULL_CONDITION_KEY, original_key_to_diffusers
from sidestep.models.device import Runtime
from sidestep.models.discovery import Layout, ModelEntry
from sidestep.models.variants import Variant

__all__ = ["LoadedModel", "load_model", "transformer_kwargs", "build_transformer", "check_weight_keys", "iter_tensors",
           "weight_files"]

_DIT = "the ACE-Step DiT described by its config.json"
_TRANSFORMER_ARGS = tuple(p for p in inspect.signature(AceStepTransformer1DModel.__init__).parameters if p != "self")


@dataclass
class LoadedModel:
    transformer: AceStepTransformer1DModel
    null_condition_emb: torch.Tensor | None  # [1, 1, encoder_hidden_size]; None when the checkpoint lacks it
    variant: Variant
    entry: ModelEntry
    runtime: Runtime

    @property
    def num_layers(self) -> int:
        return int(self.transformer.config.num_hidden_layers)


def transformer_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of AceStepTransformer1DModel found in an original or diffusers config.json."""
    return {k: config[k] for k in _TRANSFORMER_ARGS if k in config}


def build_transformer(config: dict[str, Any], device: str | torch.device = "meta") -> AceStepTransformer1DModel:
    """Instantiate the architecture from a config; on `meta` it costs no memory until weights are assigned."""
    with torch.device(device):
        return AceStepTransformer1DModel(**transformer_kwargs(config))


def load_model(entry: ModelEntry, runtime: Runtime) -> LoadedModel:
    """Read the decoder weights of `entry` into a frozen transformer on `runtime.device`."""
    model = build_transformer(entry.config)
    _check_shapes(entry, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if entry.layout is Layout.DIFFUSERS:
        model, null_emb = _load_diffusers(entry, runtime), _diffusers_null_embedding(entry, runtime)
    else:
        model, null_emb = _load_original(entry, runtime, model)
    model.requires_grad_(False).eval()
    if runtime.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    variant = entry.defaults
    return LoadedModel(model, null_emb, variant, entry, runtime)


def _load_diffusers(entry: ModelEntry, runtime: Runtime) -> AceStepTransformer1DModel:
    """diffusers' own loader for its layout; the header check above has already matched names and shapes."""
    try:
        model, info = AceStepTransformer1DModel.from_pretrained(
            entry.path, subfolder="transformer", torch_dtype=runtime.dtype, local_files_only=True,
            output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{entry.transformer_dir}: cannot load the weights "
                              f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}).") from err
    # null_condition_emb is read from condition_encoder/, wherever a converter put it
    unexpected = [k for k in info.get("unexpected_keys") or () if k != NULL_CONDITION_KEY]
    check_weight_keys(entry.path, _DIT, info.get("missing_keys"), unexpected)
    for key, tensor in model.state_dict().items():
        _check_finite(entry, key, tensor, runtime)
    return model.to(runtime.device)


def _load_original(entry: ModelEntry, runtime: Runtime, model: AceStepTransformer1DModel
                   ) -> tuple[AceStepTransformer1DModel, torch.Tensor | None]:
    """Our loader for ACE-Step's layout (diffusers has none for a `decoder.`-prefixed model.safetensors): renames
    each key, one shard open at a time so peak RAM stays near one decoder copy."""
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    null_emb: torch.Tensor | None = None
    unknown: list[str] = []
    for key, loader in iter_tensors(entry.transformer_dir, "model"):
        if key == NULL_CONDITION_KEY:
            null_emb = loader().to(runtime.device, runtime.dtype)
            continue
        target = original_key_to_diffusers(key)
        if target is None:  # encoder.*, tokenizer.*, detokenizer.*: not the DiT
            continue
        if target not in expected:
            unknown.append(key)
        elif target in state:
            raise CheckpointError(f"{entry.path}: key {key!r} maps onto {target!r}, which another key already filled.")
        else:
            state[target] = _check_finite(entry, key, _cast(loader(), runtime), runtime)
    _check_keys(entry, expected, state, unknown)
    model.load_state_dict(state, strict=True, assign=True)
    return model, null_emb


def _check_finite(entry: ModelEntry, key: str, tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{entry.path}: the weight {key} holds NaN or Inf values (a damaged or "
                              f"diverged checkpoint, or values beyond {runtime.precision}); use another model.")
    return tensor


def _cast(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    dtype = runtime.dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=runtime.device, dtype=dtype)


def _check_shapes(entry: ModelEntry, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare the weights' shapes (read from the file headers only) with the config's model, before any allocation."""
    found: dict[str, None] = {}
    unknown: list[str] = []
    for key, shape in _iter_shapes(entry):
        if key == NULL_CONDITION_KEY:
            continue
        target = original_key_to_diffusers(key) if entry.layout is Layout.ORIGINAL else key
        if target is None:  # encoder.*, tokenizer.*: not the DiT
            continue
        want = expected.get(target)
        if want is None:
            unknown.append(key)
        elif shape != want:
            raise CheckpointError(
                f"{entry.path}: config.json describes {key} as {list(want)} but the weights hold {list(shape)}; the "
                f"config does not belong to these weights (check hidden_size, heads, intermediate_size, layers).")
        found[target] = None
    _check_keys(entry, set(expected), found, unknown)


def _iter_shapes(entry: ModelEntry) -> Iterator[tuple[str, tuple[int, ...]]]:
    stem = "diffusion_pytorch_model" if entry.layout is Layout.DIFFUSERS else "model"
    for path in weight_files(entry.transformer_dir, stem):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                shapes = [(key, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: cannot read the weights ({err}).") from err
        yield from shapes


def check_weight_keys(source: Path, what: str, missing: Iterable[Any], unexpected: Iterable[Any],
                      mismatched: Iterable[Any] = ()) -> None:
    """One CheckpointError naming how many keys are missing, unexpected or mis-shaped (a few of each); else nothing."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        names = sorted(str(k) for k in keys or ())
        if names:
            parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
    if parts:
        raise CheckpointError(f"{source}: the weights do not match {what}: {'; '.join(parts)}.")


def _check_keys(entry: ModelEntry, expected: set[str], state: dict, unknown: list[str]) -> None:
    check_weight_keys(entry.path, _DIT, expected - set(state), unknown)


def weight_files(folder: Path, stem: str) -> list[Path]:
    """`folder/<stem>.safetensors`, or the shards its `.index.json` names."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            raise CheckpointError(f"{index}: cannot read the shard index ({str(err)[:120]}).") from None
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder}: no {stem}.safetensors (or sharded index) found.")


def iter_tensors(folder: Path, stem: str) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, lazy loader) for every tensor of `folder/<stem>.safetensors` or its shards, one shard open at a time
    so peak RAM stays near one copy of what the caller keeps."""
    for path in weight_files(folder, stem):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, (lambda k=key, h=handle, p=path: _get_tensor(h, k, p))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: cannot read the weights ({err}).") from err


def _get_tensor(handle: Any, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as err:  # raised in the caller's frame, outside the generator's guard
        raise CheckpointError(f"{path}: cannot read the weight {key} ({err}).") from err


def _diffusers_null_embedding(entry: ModelEntry, runtime: Runtime) -> torch.Tensor | None:
    folder = entry.path / "condition_encoder"
    if not folder.is_dir():
        return None
    for key, loader in iter_tensors(folder, "diffusion_pytorch_model"):
        if key == NULL_CONDITION_KEY:
            return loader().to(runtime.device, runtime.dtype)
    return None
