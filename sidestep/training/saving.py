"""Adapter directories in ACE-Step 1.5's own PEFT format, resumable training state, and run.json.

A saved adapter is a directory `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(decoder, dir)` loads on the ORIGINAL decoder: keys
`base_model.model.layers.N.self_attn.q_proj.lora_A.weight` (no `.default.`, no `decoder.`, no alpha
tensor); per-module ranks and alphas live in `rank_pattern`/`alpha_pattern`. Checkpoints add
`training_state.pt`. Every directory is written into a temp sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import filelock
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sidestep.data.dataset import load_pt
from sidestep.errors import CheckpointError, ConfigError, SidestepError
from sidestep.fileio import atomic_dir, check_output_dir, write_error_reason, write_json_atomic
from sidestep.models.convert import diffusers_to_original, original_to_diffusers
from sidestep.training.adapters import ADAPTER_PARAM_MARKERS, AdapterPlan, peft_config

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "STATE_FILE", "PEFT_PREFIX", "AdapterFiles", "save_adapter_dir",
           "read_adapter_dir", "adapter_tensors", "load_adapter_weights", "ace_step_config", "prepare_output", "backup_final",
           "checkpoint_dir", "final_dir", "resolve_resume", "load_training_state", "write_run_json", "SaveFailed",
           "restore_final", "output_lock", "check_finite", "prune_checkpoints"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE_FILE = "training_state.pt"
PEFT_PREFIX = "base_model.model."
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")
LOCK_FILE = ".sidestep.lock"


class SaveFailed(CheckpointError):
    """An adapter folder could not be written (full disk, permissions); nothing half-written was left."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Cannot write {path} ({reason}).")
        self.path, self.reason = Path(path), reason


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter as read from disk: its peft config (original names) and tensors keyed like the file."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def final_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "final"


def ace_step_config(plan: AdapterPlan) -> dict[str, Any]:
    """adapter_config.json for ACE-Step 1.5: peft's own fields, original module names, FEATURE_EXTRACTION."""
    data = peft_config(plan, "original", task_type="FEATURE_EXTRACTION").to_dict()
    return _jsonable(data)


def adapter_tensors(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapter of the diffusers model as ACE-Step file keys (`base_model.model.<original>...`)."""
    state = get_peft_model_state_dict(transformer, adapter_name="default")
    out = {}
    for key, value in state.items():
        module, suffix = _split_key(key)
        out[PEFT_PREFIX + diffusers_to_original(module) + suffix] = value.detach().to("cpu").contiguous()
    return out


def load_adapter_weights(transformer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ACE-Step-keyed adapter tensors into the diffusers model's injected adapter, strictly."""
    state = {}
    for key, value in tensors.items():
        module, suffix = _split_key(key.removeprefix(PEFT_PREFIX))
        state[original_to_diffusers(module) + suffix] = value
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if any(m in k for m in ADAPTER_PARAM_MARKERS)]
    expected = set(get_peft_model_state_dict(transformer, adapter_name="default"))
    missing = sorted(expected - set(state))
    if unexpected or missing:
        odd = (unexpected or missing)[0]
        raise CheckpointError(f"The saved adapter does not match the model's adapter layout (e.g. {odd}).")


def save_adapter_dir(path: Path, plan: AdapterPlan, transformer: torch.nn.Module,
                     state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write `path/` atomically: the ACE-Step adapter, plus `training_state.pt` when `state` is given and one
    JSON file per `extra` entry (name -> payload)."""
    tensors = adapter_tensors(transformer)
    try:
        with atomic_dir(path) as tmp:
            write_json_atomic(tmp / ADAPTER_CONFIG, ace_step_config(plan))
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            if state is not None:
                torch.save({"format": STATE_FORMAT, **state}, tmp / STATE_FILE)
            for name, payload in (extra or {}).items():
                write_json_atomic(tmp / name, _jsonable(payload))
    except (OSError, RuntimeError, SafetensorError, SidestepError) as err:  # torch.save: RuntimeError on a full disk
        raise SaveFailed(Path(path), write_error_reason(err)) from err
    return Path(path)


def read_adapter_dir(path: Path) -> AdapterFiles:
    """Read an ACE-Step adapter directory; a CheckpointError names the file on any problem."""
    path = Path(path)
    cfg_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8, a 5000-digit number
        raise CheckpointError(f"{cfg_path}: cannot be read ({str(err)[:120] or 'nested too deeply'}).") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{cfg_path}: not a peft adapter config (no 'peft_type').")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: cannot be read ({err}).") from err
    return AdapterFiles(config, tensors)


def prepare_output(output_dir: Path, resuming: bool, overwrite: bool) -> Path | None:
    """Refuse to replace a finished adapter or old checkpoints unless --overwrite (then keep them as .bak)."""
    output_dir = Path(output_dir)
    final, ckpts = final_dir(output_dir), output_dir / "checkpoints"
    if resuming:
        return None
    occupied = [p for p in (final, ckpts) if p.exists() and (p == final or any(ckpts.iterdir()))]
    if not occupied:
        return None
    if not overwrite:
        raise ConfigError(f"{occupied[0]} already holds a trained adapter; pass --resume latest to continue it, "
                          f"--overwrite to start over (the old one is kept as {occupied[0].name}.bak), or another --output-dir.")
    backup = None
    for old in occupied:
        backup = old.with_name(old.name + ".bak")
        if backup.exists():
            _remove_tree(backup)
        os.replace(old, backup)
    return backup


def backup_final(output_dir: Path) -> Path | None:
    """Move an existing `final/` to `final.bak/` (replacing an older backup) before a new one is written."""
    final = final_dir(output_dir)
    if not final.exists():
        return None
    backup = final.with_name("final.bak")
    if backup.exists():
        _remove_tree(backup)
    os.replace(final, backup)
    return backup


def restore_final(output_dir: Path, backup: Path | None) -> bool:
    """After a failed final save: put `final.bak/` back as `final/`; True when a previous adapter was restored."""
    final = final_dir(output_dir)
    if backup is None or not backup.is_dir() or final.exists():
        return False
    os.replace(backup, final)
    return True


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold `OUTPUT/.sidestep.lock` while training, so a second `sidestep train` into OUTPUT refuses.

    An OS file lock (flock) dies with its process: a lock file left by a killed run is stale and simply reused.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, "--output-dir")
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_path = output_dir / LOCK_FILE
    lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ConfigError(f"{output_dir} is in use by another `sidestep train` that is still running; wait for it "
                          f"to finish or choose another --output-dir.") from None
    try:
        yield
    except BaseException:
        lock.release()
        if created and [p.name for p in output_dir.iterdir()] == [LOCK_FILE]:  # a run that failed in preflight
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    lock.release()


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse adapter weights holding NaN or Inf (a diverged or damaged checkpoint) before they are trained on."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: {key} holds NaN or Inf values, so this checkpoint cannot "
                                  f"be resumed; pick an earlier one (OUTPUT/checkpoints/step-N).")


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """`latest` -> the checkpoint with the highest step under OUTPUT (final included); else the given folder."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if (path / STATE_FILE).is_file():
            return path if _resumable(path) else _checkpoint_of_final(path, resume)
        raise CheckpointError(f"--resume {resume}: {path / STATE_FILE} not found; give a checkpoint folder "
                              f"(OUTPUT/checkpoints/step-N) or 'latest'.")
    candidates = [p for p in (Path(output_dir) / "checkpoints").glob("step-*") if _STEP_DIR.fullmatch(p.name)]
    candidates = [p for p in candidates if (p / STATE_FILE).is_file()]
    if (final_dir(output_dir) / STATE_FILE).is_file() and _resumable(final_dir(output_dir)):  # written before 0.2
        candidates.append(final_dir(output_dir))
    if not candidates:
        raise CheckpointError(f"--resume latest: no checkpoint with {STATE_FILE} under {output_dir}.")
    return max(candidates, key=lambda p: (_saved_step(p), p.name == "final"))


def _resumable(path: Path) -> bool:
    """final/ holds the adapter without optimizer state; its resumable twin is checkpoints/step-N."""
    return load_training_state(path, mmap=True).get("resumable", True) is not False


def _checkpoint_of_final(path: Path, resume: str) -> Path:
    step = int(load_training_state(path, mmap=True)["step"])
    twin = checkpoint_dir(path.parent, step)
    if (twin / STATE_FILE).is_file():
        return twin
    raise CheckpointError(f"--resume {resume}: this adapter was saved without its optimizer state; resume from "
                          f"{twin} (or 'latest').")


def load_training_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """training_state.pt of a checkpoint folder (weights_only; a CheckpointError on any problem)."""
    file = Path(path) / STATE_FILE
    state = load_pt(file, lambda err: CheckpointError(
        f"{file}: cannot be read ({type(err).__name__}); pick another checkpoint."), mmap=mmap)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file}: not a sidestep training state of format {STATE_FORMAT}.")
    return state


def write_run_json(output_dir: Path, payload: dict[str, Any]) -> Path:
    path = Path(output_dir) / "run.json"
    write_json_atomic(path, _jsonable(payload))
    return path


def prune_checkpoints(output_dir: Path, keep_last: int, newest: Path) -> list[Path]:
    """Keep `newest` (complete on disk: it was renamed into place whole) and the `keep_last - 1` checkpoints
    saved before it; remove older `checkpoints/step-N`. Checkpoints of higher steps (left by a run that was
    resumed from an earlier one) are not older, so they stay. Returns what was removed."""
    if keep_last <= 0:
        return []
    step = _saved_step(Path(newest))
    older = [p for p in (Path(output_dir) / "checkpoints").glob("step-*")
             if _STEP_DIR.fullmatch(p.name) and p.is_dir() and _saved_step(p) < step]
    older.sort(key=_saved_step, reverse=True)
    removed = older[keep_last - 1:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _saved_step(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    if match:
        return int(match.group(1))
    return int(load_training_state(path, mmap=True)["step"])


def _split_key(key: str) -> tuple[str, str]:
    """`layers.0.self_attn.to_q.lora_A.weight` -> (`layers.0.self_attn.to_q`, `.lora_A.weight`)."""
    cut = min((key.find(m) for m in ADAPTER_PARAM_MARKERS if m in key), default=-1)
    if cut < 0:
        raise CheckpointError(f"Adapter key {key!r} holds no LoRA/LoHa/LoKr weight name.")
    return key[:cut], key[cut:]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), str):  # str enums (PeftType, ours)
        return obj.value
    return obj


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path)
