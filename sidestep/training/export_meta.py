"""Training metadata in an exported LoRA's safetensors header, under kohya sd-scripts' `ss_*` key names.

LoRA browsers (ComfyUI's LoRA info nodes, A1111/Forge, Civitai's uploader) read these keys to show what a file
was trained on. Header values are strings only; numbers are written as their decimal text. The run's record
(`run.json` beside `final/` and `checkpoints/`) supplies the model and schedule; the ranks come from the adapter
itself, so a file converted from another export (whose own `ss_*` keys are carried over) stays truthful.
See docs/adapter-formats.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping

from sidestep.data.dataset import dataset_hash

__all__ = ["run_name", "run_record", "training_metadata", "BASE_MODEL_PREFIX"]

BASE_MODEL_PREFIX = "acestep_v15_"  # ss_base_model_version: acestep_v15_base, acestep_v15_xl_turbo, ...
_CARRIED = ("ss_", "modelspec.", "sshs_")  # keys of a source file's header that describe its training


def run_name(src: Path) -> str:
    """The name an export of `src` is filed under: the training output folder's name, `<run>-step-N` for a
    checkpoint, the folder name for any other adapter folder, the file stem for a file."""
    src = Path(src).resolve()
    if src.is_file():
        return src.stem
    if src.name == "final":
        return src.parent.name
    if src.parent.name == "checkpoints":
        return f"{src.parent.parent.name}-{src.name}"
    return src.name


def run_record(src: Path) -> dict[str, Any]:
    """The run.json of the training run `src` (an adapter folder) came from, or {} when there is none."""
    src = Path(src).resolve()
    for folder in (src, src.parent, src.parent.parent):
        path = folder / "run.json"
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                return {}  # a damaged record leaves the header without training facts, never stops an export
            return record if isinstance(record, dict) else {}
    return {}


def training_metadata(ranks: Mapping[str, int], alphas: Mapping[str, float], src: Path,
                      source_header: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `ss_*` header for an export of the adapter with these per-module `ranks`/`alphas`, taken from `src`."""
    meta = {k: v for k, v in (source_header or {}).items() if k.startswith(_CARRIED)}
    values = sorted(ranks.values())
    common = max(set(values), key=lambda r: (values.count(r), r)) if values else 0
    common_alpha = next((alphas[n] for n, r in ranks.items() if r == common), float(common))
    meta.update({
        "ss_network_module": "sidestep.lora",
        "ss_network_dim": str(common),
        "ss_network_alpha": f"{common_alpha:g}",
        "ss_network_args": json.dumps({
            "adaptive": len(set(values)) > 1, "modules": len(values), "rank_min": values[0] if values else 0,
            "rank_median": statistics.median(values) if values else 0, "rank_max": values[-1] if values else 0,
        }),
        "modelspec.architecture": "ace-step-v1.5/lora",
        "modelspec.implementation": "https://github.com/ace-step/ACE-Step-1.5",
    })
    meta.update(_from_record(run_record(src) if Path(src).is_dir() else {}))
    meta.setdefault("ss_output_name", run_name(src))
    return meta


def _from_record(record: Mapping[str, Any]) -> dict[str, str]:
    if not record:
        return {}
    config = record.get("config") or {}
    model = record.get("model") or {}
    out: dict[str, Any] = {
        "ss_output_name": Path(str(config.get("output_dir", ""))).name or None,
        "ss_base_model_version": BASE_MODEL_PREFIX + str(model["variant"]).replace("-", "_") if model.get("variant") else None,
        "ss_sd_model_name": model.get("name"),
        "ss_steps": _first(record, "steps_done", "steps", "total_steps"),
        "ss_max_train_steps": record.get("total_steps"),
        "ss_num_epochs": config.get("epochs"),
        "ss_learning_rate": config.get("lr"),
        "ss_lr_scheduler": config.get("scheduler"),
        "ss_lr_warmup_steps": config.get("warmup_steps"),
        "ss_optimizer": config.get("optimizer"),
        "ss_seed": config.get("seed"),
        "ss_gradient_accumulation_steps": config.get("grad_accum"),
        "ss_max_grad_norm": config.get("max_grad_norm"),
        "ss_network_dropout": config.get("dropout"),
        "ss_mixed_precision": (record.get("runtime") or {}).get("precision"),
        "ss_training_started_at": record.get("started_at"),
        "ss_dataset_dirs": json.dumps({Path(str(config["dataset_dir"])).name: {}}) if config.get("dataset_dir") else None,
        # the fingerprint fisher_map.json stores too (names and sizes of the .pt files), taken now: a record
        # that kept its own (run.json's dataset_hash) wins
        "ss_dataset_hash": record.get("dataset_hash") or _dataset_hash(config.get("dataset_dir")),
        "modelspec.title": Path(str(config.get("output_dir", ""))).name or None,
    }
    return {k: str(v) for k, v in out.items() if v is not None and v != ""}


def _dataset_hash(folder: Any) -> str | None:
    if not folder or not any(Path(str(folder)).glob("*.pt")):
        return None
    return dataset_hash(Path(str(folder)))


def _first(record: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None
