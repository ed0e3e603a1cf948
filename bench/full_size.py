"""Benchmark: the whole user path at the real model size, on whatever device there is (meant for one GPU).

Writes an ACE-Step 1.5 checkpoint in the original layout at the 2B configuration (24 layers, hidden 2048, MLP
6144, 16 heads, 8 KV heads; random seeded weights in bf16, as the released files are) and a dataset of real-format
`.pt` files of 40-60 s songs, then runs, through the CLI in this process:

1. `sidestep analyze` with the default signal (the LoRA probe),
2. `sidestep analyze --rank-signal data` (the hook analysis alone; the difference is the probe's cost),
3. `sidestep train --max-steps N` on the probe's map (Adaptive Rank mode, DataLoader workers on).

For each phase: wall time and peak device memory (CUDA allocator; on CPU the process high-water mark). The probe's
`lr_used`, losses and the map's size are read back from the written map. Random weights say nothing about what
the map finds; they do say what the analysis costs and whether the default probe rate learns at this width.

    .venv/bin/python bench/full_size.py --out full.json            # real size; needs a GPU
    .venv/bin/python bench/full_size.py --quick                    # tiny, CPU, to check the bench itself
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak, reset_peak  # noqa: E402

from sidestep.testing.tiny import tiny_config, write_dataset, write_original_checkpoint  # noqa: E402

FULL = dict(layers=24, hidden=2048, intermediate=6144, heads=16, kv_heads=8, head_dim=128, window=128,
            samples=8, frames="1000,1500", encoder_length=128, train_steps=10, ranks="")
QUICK = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, window=8,
             samples=4, frames="40,60", encoder_length=16, train_steps=2,
             ranks="--rank 8 --rank-min 4 --rank-max 16 --probe-steps 4")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU (checks the bench, measures nothing)")
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and data here")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the JSON result here, after every phase (a run stopped at a time limit keeps "
                        "what it measured)")
    p.add_argument("--extra-analyze", default="", help="extra flags for both analyze runs (space-separated)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        setattr(args, key, value)
    args.device = args.device or ("cpu" if args.quick else "auto")
    return args


def _config(args: argparse.Namespace) -> dict:
    return tiny_config(args.layers, args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.head_dim, sliding_window=args.window)


def _write_inputs(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    write_original_checkpoint(root / "checkpoints", _config(args), dtype=torch.bfloat16)
    low, high = (int(x) for x in args.frames.split(","))
    write_dataset(root / "data", count=args.samples, encoder_width=args.hidden, lengths=(low, high),
                  encoder_length=args.encoder_length, dtype=torch.bfloat16)
    return root / "checkpoints", root / "data"


def _run_cli(argv: list[str]) -> None:
    from sidestep.cli.app import app

    try:
        app(argv, standalone_mode=False)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise RuntimeError(f"sidestep {' '.join(argv)} exited {stop.code}") from None


def _save(out: Path | None, results: dict) -> None:
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _phase(name: str, argv: list[str], device: torch.device, results: dict, emit, out: Path | None) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    started = time.perf_counter()
    _run_cli(argv)
    if device.type == "cuda":
        torch.cuda.synchronize()
    results[name] = {"seconds": round(time.perf_counter() - started, 2), "peak_gib": round(peak(device) / 2**30, 2)}
    emit(json.dumps({"phase": name, **results[name]}))
    _save(out, results)


def _map_facts(path: Path) -> dict:
    raw = json.loads(path.read_text(encoding="utf-8"))
    probe = raw.get("probe") or {}
    keep = ("steps", "lr", "lr_used", "loss_before", "loss_probed", "top10_share", "spread_evenly")
    return {"modules": len(raw.get("modules", raw.get("rank_pattern", {}))), **{k: probe.get(k) for k in keep}}


def main(argv: list[str] | None = None, emit=print) -> dict:
    args = _args(argv)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "layers": args.layers, "hidden": args.hidden, "samples": args.samples, "frames": args.frames}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        started = time.perf_counter()
        checkpoints, data = _write_inputs(root, args)
        results["write_inputs_seconds"] = round(time.perf_counter() - started, 2)
        emit(json.dumps({"phase": "write_inputs", "seconds": results["write_inputs_seconds"]}))
        _save(args.out, results)
        common = ["--dataset-dir", str(data), "--checkpoint-dir", str(checkpoints), "--model", "base",
                  "--device", args.device, "--yes", "--json", *args.ranks.split(), *args.extra_analyze.split()]
        _phase("analyze_probe", ["analyze", *common, "--output", str(data / "fisher_map.json")], device, results, emit,
               args.out)
        results["probe_map"] = _map_facts(data / "fisher_map.json")
        emit(json.dumps({"probe_map": results["probe_map"]}))
        _save(args.out, results)
        _phase("analyze_data", ["analyze", *common, "--rank-signal", "data", "--output", str(root / "data_map.json")],
               device, results, emit, args.out)
        probe_cost = results["analyze_probe"]["seconds"] - results["analyze_data"]["seconds"]
        results["probe_share_of_analysis"] = round(probe_cost / results["analyze_probe"]["seconds"], 3)
        _phase("train", ["train", "--dataset-dir", str(data), "--output-dir", str(root / "run"), "--checkpoint-dir",
                         str(checkpoints), "--model", "base", "--device", args.device, "--max-steps",
                         str(args.train_steps), "--json"], device, results, emit, args.out)
    emit(json.dumps(results))
    _save(args.out, results)
    return results


if __name__ == "__main__":
    main()
