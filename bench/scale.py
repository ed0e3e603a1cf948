"""Benchmark: data-parallel training throughput, 1 vs N processes, and the all-reduce share of a step.

Each arm launches its processes the way torchrun does (RANK / WORLD_SIZE / MASTER_* in the environment) and
runs sidestep's training step on a tiny real-architecture DiT with a flat LoRA: per process `--batch`
synthetic samples per step, forward/backward of the flow-matching loss, `distributed.average_gradients`
(the one all-reduce, timed on its own), clipping and AdamW. Samples/s counts all processes.

On a CPU-only machine the processes share the same cores, so this measures the overhead of the extra process
and of gloo's all-reduce, not a speedup; on N GPUs (`--device cuda`) it measures the real scaling.

    .venv/bin/python bench/scale.py                    # CPU, 1 vs 2 processes (~1 min)
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
import time

import torch


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process).")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="Process counts to compare.")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--frames", type=int, default=128, help="Latent frames per sample.")
    p.add_argument("--batch", type=int, default=1, help="Samples per process per step.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on every targetable module.")
    p.add_argument("--steps", type=int, default=20, help="Timed steps (after 3 warm-up steps).")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (1: no oversubscription).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _worker(args: argparse.Namespace) -> None:
    from sidestep import distributed
    from sidestep.analysis.modules import targetable_modules
    from sidestep.data import Batch
    from sidestep.models.device import resolve_runtime
    from sidestep.objective import flow_matching_loss, noise_like
    from sidestep.testing.tiny import build_tiny_transformer, tiny_config
    from sidestep.training.adapters import AdapterPlan, attach_adapter
    from sidestep.training.config import AdapterKind, TrainConfig
    from sidestep.training.loop import build_optimization

    with distributed.session() as dist:
        runtime = dist.place(resolve_runtime(args.device, None, False))
        cfg = tiny_config(args.layers, args.hidden)
        with torch.device(runtime.device):
            model = build_tiny_transformer(cfg, seed=0).to(runtime.dtype).requires_grad_(False)
        names = targetable_modules(args.layers)
        plan = AdapterPlan(AdapterKind.LORA, dict.fromkeys(names, args.rank), dict.fromkeys(names, 2.0 * args.rank),
                           0.0, args.rank, 2.0 * args.rank)
        torch.manual_seed(0)
        trainable = attach_adapter(model, plan)
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        opt = build_optimization(params, TrainConfig("d", "o", warmup_steps=0), 10_000, runtime)
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker:
        _worker(args)
        return
    results = [_launch(argv, world) for world in args.processes]
    base = results[0]["samples_per_s"]
    for r in results:
        r["speedup"] = round(r["samples_per_s"] / base, 3)
    note = (f"CPU only, {args.threads} thread(s) per process on {os.cpu_count()} shared cores: this measures the "
            "overhead of data parallelism (extra process, gloo all-reduce, waiting for the slower process), not "
            "the speedup of N GPUs." if args.device == "cpu" else
            "One GPU per process; speedup is samples/s relative to the first process count.")
    print(json.dumps({"benchmark": "scale", "cpu_cores": os.cpu_count(), "platform": platform.platform(),
                      "torch": torch.__version__, "model": {"layers": args.layers, "hidden": args.hidden,
                      "frames": args.frames, "lora_rank": args.rank}, "batch_per_process": args.batch,
                      "steps": args.steps, "note": note, "results": results}, indent=2))


if __name__ == "__main__":
    main()
