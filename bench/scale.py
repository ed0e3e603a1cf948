"""Benchmark: data-parallel training throughput and the analysis probe's time, 1 vs N processes.

Each arm launches its processes the way torchrun does (RANK / WORLD_SIZE / MASTER_* in the environment).

`--job train` (the default) runs sidestep's training step on a tiny real-architecture DiT with a flat LoRA:
per process `--batch` synthetic samples per step, forward/backward of the flow-matching loss,
`distributed.average_gradients` (the one all-reduce, timed on its own), clipping and AdamW. Samples/s counts
all processes.

`--job probe`: the `--rank-signal probe` phase of `sidestep analyze` (`sidestep.analysis.probe.measure_probe`:
`--steps` training steps of 4 samples, then the attribution passes) on a tiny real-architecture checkpoint and
dataset written to a temporary folder, timed whole after a short warm-up probe. The processes split its
samples and passes, so the speedup is its wall time on one process over that on N.

On a CPU-only machine the processes share the same cores: with `--threads 1` and N ≤ cores this shows how
much of the work is split; with more processes than cores it measures only the overhead. On N GPUs
(`--device cuda`) it measures the real scaling.

    .venv/bin/python bench/scale.py                    # CPU, training, 1 vs 2 processes (~1 min)
    .venv/bin/python bench/scale.py --job probe        # CPU, the 40-step analysis probe, 1 vs 2 processes (~1 min)
    .venv/bin/python bench/scale.py --device cuda --processes 1 2 4 --layers 8 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=("train", "probe"), default="train", help="What to time (see above).")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process).")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="Process counts to compare.")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--frames", type=int, default=128, help="Latent frames per sample.")
    p.add_argument("--batch", type=int, default=1, help="Samples per process per step.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on every targetable module.")
    p.add_argument("--steps", type=int, default=None, help="Timed steps (train: after 3 warm-up steps, default 20; "
                   "probe: the probe's training steps, default 40 as in `sidestep analyze`).")
    p.add_argument("--samples", type=int, default=8, help="probe: songs in the generated dataset.")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (1: no oversubscription).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)  # probe: the checkpoint and dataset
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 40 if args.job == "probe" else 20
    return args


def _worker(args: argparse.Namespace) -> None:
    from sidestep import distributed
    from sidestep.analysis.modules import targetable_modules
    from sidestep.data import Batch
    from sidestep.models.device import on_this_process, resolve_runtime
    from sidestep.objective import flow_matching_loss, noise_like
    from sidestep.testing.tiny import build_tiny_transformer, tiny_config
    from sidestep.training.adapters import AdapterPlan, attach_adapter
    from sidestep.training.config import AdapterKind, TrainConfig
    from sidestep.training.loop import build_optimization

    with distributed.session() as dist:
        runtime = on_this_process(resolve_runtime(args.device, None, False))
        cfg = tiny_config(args.layers, args.hidden)
        with torch.device(runtime.device):
            model = build_tiny_transformer(cfg, seed=0).to(runtime.dtype).requires_grad_(False)
        names = targetable_modules(args.layers)
        plan = AdapterPlan(AdapterKind.LORA, dict.fromkeys(names, args.rank), dict.fromkeys(names, 2.0 * args.rank),
                           0.0, args.rank, 2.0 * args.rank)
        torch.manual_seed(0)
        trainable = attach_adapter(model, plan)
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        opt = build_optimization(params, TrainConfig("d", "o", lr=1e-4, warmup_steps=0), 10_000, runtime)
        gen = torch.Generator().manual_seed(1 + dist.rank)
        b, f = args.batch, args.frames
        batch = Batch(["x"] * b, torch.randn(b, f, 64, generator=gen), torch.ones(b, f),
                      torch.randn(b, 32, args.hidden, generator=gen), torch.ones(b, 32, dtype=torch.bool),
                      torch.randn(b, f, 128, generator=gen)).to(runtime.device, runtime.dtype)
        model.train()
        step_s = reduce_s = 0.0
        for step in range(args.steps + 3):
            _sync(runtime.device)
            start = time.perf_counter()
            t = torch.rand(b, generator=gen)
            with torch.autocast(runtime.device.type, dtype=runtime.dtype, enabled=runtime.dtype != torch.float32):
                loss = flow_matching_loss(model, batch, t, noise_like(batch.target_latents, gen))
            loss.backward()
            _sync(runtime.device)
            before = time.perf_counter()
            distributed.average_gradients(params, float(loss.detach()))
            _sync(runtime.device)
            reduced = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.optimizer.step()
            opt.optimizer.zero_grad(set_to_none=True)
            _sync(runtime.device)
            if step >= 3:  # warm-up: allocator, kernels, gloo connections
                step_s += time.perf_counter() - start
                reduce_s += reduced - before
        if dist.is_main:
            samples = args.steps * b * dist.world_size
            print(json.dumps({"processes": dist.world_size, "samples_per_s": round(samples / step_s, 3),
                              "step_ms": round(1000 * step_s / args.steps, 3),
                              "allreduce_ms": round(1000 * reduce_s / args.steps, 3),
                              "allreduce_share": round(reduce_s / step_s, 4), "trainable_params": trainable,
                              "device": str(runtime.device)}))


def _probe_worker(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from sidestep import distributed
    from sidestep.analysis.modules import targetable_modules
    from sidestep.analysis.probe import ProbeSettings, measure_probe
    from sidestep.data import DatasetSpec, scan_dataset
    from sidestep.models import find_model, load_model
    from sidestep.models.device import on_this_process, resolve_runtime

    with distributed.session() as dist:
        runtime = on_this_process(resolve_runtime(args.device, None, False))
        loaded = load_model(find_model(args.root / "checkpoints", "base"), runtime)
        spec = DatasetSpec.from_model_config(loaded.entry.config)
        files = list(scan_dataset(args.root / "dataset", spec).files)
        names = targetable_modules(loaded.num_layers)
        settings = ProbeSettings(steps=args.steps, rank=8, lr=1e-2)
        measure_probe(loaded, names, files, spec, replace(settings, steps=1, eval_samples=1, points=1), seed=0)
        _sync(runtime.device)
        start = time.perf_counter()
        result = measure_probe(loaded, names, files, spec, settings, seed=0)
        _sync(runtime.device)
        seconds = time.perf_counter() - start
        if dist.is_main:
            print(json.dumps({"processes": dist.world_size, "probe_s": round(seconds, 3),
                              "loss_fall": round((result.loss_before - result.loss_probed) / result.loss_before, 6),
                              "device": str(runtime.device)}))


def _write_probe_inputs(root: Path, args: argparse.Namespace) -> None:
    from sidestep.testing.tiny import tiny_config, write_dataset, write_original_checkpoint

    write_original_checkpoint(root / "checkpoints", tiny_config(args.layers, args.hidden), seed=0)
    write_dataset(root / "dataset", count=args.samples, encoder_width=args.hidden, seed=0,
                  lengths=(args.frames // 2, args.frames), encoder_length=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _launch(argv: list[str], world: int) -> dict:
    """Start `world` worker processes like torchrun and return process 0's JSON."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = int(_args(argv).threads)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        if proc.returncode != 0:
            raise SystemExit(f"a {world}-process worker failed:\n{err}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker:
        (_probe_worker if args.job == "probe" else _worker)(args)
        return {}
    if args.job == "probe":
        with tempfile.TemporaryDirectory() as tmp:
            _write_probe_inputs(Path(tmp), args)
            results = [_launch([*argv, "--root", tmp], world) for world in args.processes]
        for r in results:
            r["speedup"] = round(results[0]["probe_s"] / r["probe_s"], 3)
    else:
        results = [_launch(argv, world) for world in args.processes]
        for r in results:
            r["speedup"] = round(r["samples_per_s"] / results[0]["samples_per_s"], 3)
    note = (f"CPU only, {args.threads} thread(s) per process on {os.cpu_count()} shared cores: with no more "
            "processes than free cores this shows how much of the work is split; beyond that only the overhead "
            "of data parallelism (extra process, gloo all-reduce, waiting for the slower process)."
            if args.device == "cpu" else "One GPU per process; speedup relative to the first process count.")
    summary = {"benchmark": "scale", "job": args.job, "cpu_cores": os.cpu_count(), "platform": platform.platform(),
               "torch": torch.__version__, "model": {"layers": args.layers, "hidden": args.hidden,
               "frames": args.frames}, **_job_settings(args), "note": note, "results": results}
    print(json.dumps(summary, indent=2))
    return summary


def _job_settings(args: argparse.Namespace) -> dict:
    if args.job == "probe":
        return {"probe": {"steps": args.steps, "rank": 8, "samples_per_step": 4, "songs": args.samples}}
    return {"lora_rank": args.rank, "batch_per_process": args.batch, "steps": args.steps}


if __name__ == "__main__":
    main()
