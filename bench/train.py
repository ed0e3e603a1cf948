"""Benchmark: training speed and peak memory, flat LoRA vs Adaptive Rank at an equal parameter budget.

Flat: rank R on every targetable module. Adaptive: the modules Preprocessing++ would keep (here chosen from
a seeded random score, with its category floor), ranks from `allocate_ranks` in `flat` budget mode, so
Σ r·(in+out) matches the flat adapter within 1% (checked). Both arms run the training step of
`sidestep.training.loop` (flow-matching loss under autocast, backward, clipping, AdamW on fp32 adapter
weights) on the same synthetic batches, timesteps and noise. Steps are timed interleaved (flat, adaptive,
flat, ...) in this process so background load hits both alike; peak memory is measured in a fresh
subprocess per arm (CUDA: max_memory_allocated; CPU: peak RSS delta with the high-water mark reset).

    .venv/bin/python bench/train.py                 # CPU: 8 layers, hidden 256, 256 frames (~1-2 min)
    .venv/bin/python bench/train.py --quick         # a few seconds
    .venv/bin/python bench/train.py --device cuda --real-size --frames 750   # the 2B DiT, 30 s crops, bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

from memory import memory_now, peak as peak_memory, reset_peak  # bench/memory.py (bench/ is on sys.path)

from sidestep.analysis.allocate import BudgetMode, RankBudget, allocate_ranks, select_modules
from sidestep.analysis.modules import targetable_modules
from sidestep.data import Batch
from sidestep.models.device import resolve_runtime
from sidestep.objective import flow_matching_loss, noise_like
from sidestep.testing.tiny import build_tiny_transformer, tiny_config
from sidestep.training.adapters import AdapterPlan, attach_adapter, module_shapes
from sidestep.training.config import AdapterKind, TrainConfig
from sidestep.training.loop import build_optimization

ARMS = ("flat", "adaptive")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 layers, hidden 128, 64 frames, 5 steps.")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA).")
    p.add_argument("--real-size", action="store_true", help="The 2B DiT: 24 layers, hidden 2048, MLP 6144.")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--frames", type=int, default=256, help="Latent frames per sample (25 per second).")
    p.add_argument("--steps", type=int, default=12, help="Timed optimizer steps per arm.")
    p.add_argument("--rank", type=int, default=16, help="The flat rank, whose parameter count both arms spend.")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", action="store_true", help="Also report audio samples during training: share of "
                                                          "training time, peak memory with/without (bench/sampling.py).")
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.frames, args.steps = 4, 128, 64, 5
    if args.real_size:
        args.layers, args.hidden = 24, 2048
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def _model_config(args: argparse.Namespace) -> dict:
    if args.real_size:
        return tiny_config(24, 2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                           head_dim=128, sliding_window=128)
    return tiny_config(args.layers, args.hidden)


def plans(args: argparse.Namespace, shapes: dict) -> dict[str, AdapterPlan]:
    """The flat plan and an adaptive plan with the same Σ r·(in+out) (flat budget mode of allocate_ranks)."""
    names = targetable_modules(args.layers)
    gen = torch.Generator().manual_seed(args.seed)
    scores = dict(zip(names, (torch.rand(len(names), generator=gen) ** 4).tolist()))  # skewed like Fisher scores
    chosen = select_modules(scores)
    budget = RankBudget(base=args.rank, lo=max(1, args.rank // 4), hi=args.rank * 4, mode=BudgetMode.FLAT)
    alloc = allocate_ranks({n: scores[n] for n in chosen}, {n: shapes[n] for n in chosen}, budget, shapes)
    flat = AdapterPlan(AdapterKind.LORA, dict.fromkeys(names, args.rank), dict.fromkeys(names, 2.0 * args.rank),
                       0.0, args.rank, 2.0 * args.rank)
    adaptive = AdapterPlan(AdapterKind.LORA, dict(alloc.ranks), {n: float(a) for n, a in alloc.alphas.items()},
                           0.0, args.rank, 2.0 * args.rank, adaptive=True)
    return {"flat": flat, "adaptive": adaptive}


class Arm:
    """One model + adapter + optimizer, stepping exactly like the training loop."""

    def __init__(self, args: argparse.Namespace, plan: AdapterPlan, runtime) -> None:
        self.runtime = runtime
        with torch.device(runtime.device):
            self.model = build_tiny_transformer(_model_config(args), seed=args.seed)
        self.model.to(runtime.dtype).requires_grad_(False)
        if args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        torch.manual_seed(args.seed)
        self.params_count = attach_adapter(self.model, plan)
        params = [p for _, p in sorted(self.model.named_parameters()) if p.requires_grad]
        self.opt = build_optimization(params, TrainConfig("d", "o", warmup_steps=0), 10_000, runtime)
        self.model.train()

    def step(self, batch: Batch, t: torch.Tensor, noise: torch.Tensor) -> float:
        rt = self.runtime
        with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32):
            loss = flow_matching_loss(self.model, batch, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.opt.params, 1.0)
        self.opt.optimizer.step()
        self.opt.scheduler.step()
        self.opt.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _batches(args: argparse.Namespace, runtime, count: int) -> list[tuple[Batch, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    enc_width = _model_config(args)["hidden_size"]
    out = []
    for _ in range(count):
        frames = args.frames
        batch = Batch(["x"], torch.randn(1, frames, 64, generator=gen), torch.ones(1, frames),
                      torch.randn(1, 64, enc_width, generator=gen), torch.ones(1, 64, dtype=torch.bool),
                      torch.randn(1, frames, 128, generator=gen)).to(runtime.device, runtime.dtype)
        t = torch.sigmoid(-0.4 + torch.randn(1, generator=gen))
        out.append((batch, t, noise_like(batch.target_latents, gen)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timing(args: argparse.Namespace, runtime, arm_plans: dict[str, AdapterPlan]) -> dict[str, dict]:
    arms = {name: Arm(args, plan, runtime) for name, plan in arm_plans.items()}
    batches = _batches(args, runtime, args.steps + 2)
    seconds = dict.fromkeys(arms, 0.0)
    losses: dict[str, list[float]] = {name: [] for name in arms}
    for i, batch in enumerate(batches):
        for name, arm in arms.items():
            _sync(runtime.device)
            start = time.perf_counter()
            losses[name].append(arm.step(*batch))
            _sync(runtime.device)
            if i >= 2:  # the first steps pay for lazy kernel and allocator setup
                seconds[name] += time.perf_counter() - start
    return {name: {"trainable_params": arms[name].params_count, "modules": len(arm_plans[name].ranks),
                   "steps_per_s": round(args.steps / seconds[name], 3), "final_loss": round(losses[name][-1], 4)}
            for name in arms}


def _worker(args: argparse.Namespace) -> None:
    runtime = resolve_runtime(args.device, args.precision, args.gradient_checkpointing)
    arm_plans = plans(args, _shapes(args))
    batches = _batches(args, runtime, 4)
    arm = Arm(args, arm_plans[args.worker], runtime)
    arm.step(*batches[0])
    gc.collect()
    base = memory_now(runtime.device)
    reset_peak(runtime.device)
    for batch in batches[1:]:
        arm.step(*batch)
    _sync(runtime.device)
    print(json.dumps({"peak_bytes": peak_memory(runtime.device) - base}))


def _shapes(args: argparse.Namespace) -> dict:
    with torch.device("meta"):
        return module_shapes(build_tiny_transformer(_model_config(args)))










def _memory(argv: list[str], arm: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # glibc returns big blocks at free: RSS tracks live memory
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", arm], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory worker {arm} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker:
        _worker(args)
        return
    runtime = resolve_runtime(args.device, args.precision, args.gradient_checkpointing)
    arm_plans = plans(args, _shapes(args))
    started = time.perf_counter()
    result = _timing(args, runtime, arm_plans)
    flat, adaptive = result["flat"]["trainable_params"], result["adaptive"]["trainable_params"]
    if abs(adaptive - flat) > 0.01 * flat:
        raise SystemExit(f"budgets differ by more than 1%: flat {flat}, adaptive {adaptive}")
    for name in ARMS:
        result[name]["peak_mem_mb"] = round(_memory(argv, name) / 2**20, 1)
        result[name]["rank_histogram"] = {str(r): n for r, n in sorted(
            __import__("collections").Counter(arm_plans[name].ranks.values()).items())}
    print(json.dumps({
        "benchmark": "train: flat vs adaptive rank at equal trainable parameters",
        "device": str(runtime.device) + (f" ({torch.cuda.get_device_name()})" if runtime.device.type == "cuda" else ""),
        "precision": runtime.precision, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": {"layers": args.layers, "hidden": _model_config(args)["hidden_size"], "frames": args.frames,
                  "gradient_checkpointing": args.gradient_checkpointing},
        "flat_rank": args.rank, "timed_steps": args.steps,
        "param_ratio_adaptive_over_flat": round(adaptive / flat, 4),
        "speed_ratio_adaptive_over_flat": round(result["adaptive"]["steps_per_s"] / result["flat"]["steps_per_s"], 3),
        "memory_note": "CUDA max_memory_allocated delta" if runtime.device.type == "cuda" else "peak RSS delta",
        "arms": result, "seconds": round(time.perf_counter() - started, 1), **_sampling(args),
    }, indent=2))


def _sampling(args: argparse.Namespace) -> dict:
    """With --sampling: bench/sampling.py's report at this model size (two real `train` runs)."""
    if not args.sampling:
        return {}
    from sampling import sampling_report  # bench/sampling.py

    # The same model size as the arms above; --quick only shortens the runs and the prompt.
    argv = ["--device", args.device, "--layers", str(args.layers), "--hidden", str(args.hidden),
            "--frames", str(args.frames), *(["--precision", args.precision] if args.precision else []),
            *(["--real-size"] if args.real_size else []),
            *(["--steps", "6", "--every", "3", "--duration", "2"] if args.quick else [])]
    return {"sampling": sampling_report(argv)}


if __name__ == "__main__":
    main()
