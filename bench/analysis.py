"""Benchmark: our one-pass hooked Fisher engine vs the reference algorithm (three passes, per-parameter .item()).

The reference (Side-Step's Preprocessing++, re-implemented here from its description as the baseline):
for each module group (self-attention, cross-attention, MLP) a separate pass over the batches; in each
pass only that group's weights require grad, one forward+backward per batch, then a loop over every
parameter adding `grad.float().pow(2).sum().item()` and its numel to Python accumulators, then
`zero_grad`, all requires_grad off, `gc.collect()` and a cache flush. Gradient checkpointing is on, as the
reference enables it. For a like-for-like comparison both arms see the same batches, timesteps and noise
(the reference itself draws them unseeded).

Ours: `sidestep.analysis.engine.FisherEngine` — one forward+backward per batch, post-accumulate-grad hooks
folding each gradient into device accumulators (squared norm + the k = rank_max+16 input-side sketch) and
freeing it, plus the per-batch convergence check (one host copy). Same gradient checkpointing.

A third arm, "reference_lean", is the same three-pass algorithm without the per-pass gc.collect() and cache
flush, to show how much of the gap is the algorithm itself. Timing runs the arms interleaved batch by batch in this process (so background load hits both alike);
peak memory is measured in a fresh subprocess per arm (CUDA: max_memory_allocated; CPU: peak RSS with the
kernel's high-water mark reset before the first batch and glibc told to return large blocks at once).

    .venv/bin/python bench/analysis.py            # 8 layers, hidden 256, 500 latent frames
    .venv/bin/python bench/analysis.py --quick    # smaller, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memory import memory_now, peak as peak_memory, reset_peak  # bench/memory.py (bench/ is on sys.path)
import torch.nn.functional as F

from sidestep.analysis.convergence import ConvergenceTracker, spearman
from sidestep.analysis.engine import FisherEngine
from sidestep.analysis.modules import category_of, targetable_modules
from sidestep.data import DatasetSpec, collate, load_sample
from sidestep.models import original_to_diffusers
from sidestep.objective import flow_matching_loss, noise_like
from sidestep.testing.tiny import build_tiny_transformer, tiny_config, write_dataset


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 layers, hidden 128, 4 batches: a smoke run.")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="Latent frames per sample (2 frames = 1 token).")
    p.add_argument("--batches", type=int, default=None, help="Timed batches per arm.")
    p.add_argument("--rank-max", type=int, default=None,
                   help="Sketch width k = rank_max + 16 (ours); default hidden/16, the ratio of the product's "
                        "default 128 to the real model's hidden 2048.")
    p.add_argument("--real-size", action="store_true",
                   help="The real 2B DiT shape: 24 layers, hidden 2048, MLP 6144, 16 heads (needs a GPU).")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--memory-batches", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = (4, 128, 250, 4) if args.quick else (24, 2048, 1500, 4) if args.real_size else (8, 256, 500, 8)
    for name, value in zip(("layers", "hidden", "frames", "batches"), size):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rank_max is None:
        args.rank_max = max(8, args.hidden // 16)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# ---- setup -----------------------------------------------------------------------------------------


def _setup(args: argparse.Namespace, folder: Path):
    """The model (gradient checkpointing on, frozen) and pre-loaded batches with their seeded t and noise."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    real = dict(intermediate_size=3 * args.hidden, num_attention_heads=16, num_key_value_heads=8,
                head_dim=args.hidden // 16) if args.real_size else {}
    cfg = tiny_config(num_layers=args.layers, hidden=args.hidden, sliding_window=128, **real)
    with torch.device(device):  # initialise where it runs: a 2B model builds in seconds on a GPU
        model = build_tiny_transformer(cfg, seed=args.seed).to(dtype)
    model.requires_grad_(False)
    model.enable_gradient_checkpointing()
    count = args.batches + 1
    paths = write_dataset(folder, count=count, encoder_width=args.hidden, seed=args.seed,
                          lengths=(args.frames, args.frames), encoder_length=769 if args.real_size else 256)
    spec = DatasetSpec.from_model_config(cfg)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for path in paths:
        batch = collate([load_sample(path, spec)]).to(device, dtype)
        t = torch.sigmoid(-0.4 + torch.randn(1, generator=gen))
        batches.append((batch, t, noise_like(batch.target_latents, gen)))
    return model, batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the reference arm -----------------------------------------------------------------------------


class Reference:
    """Three passes per batch, one per module group, `.item()` per parameter (see the module docstring)."""

    GROUPS = ("self_attn", "cross_attn", "mlp")

    def __init__(self, model: torch.nn.Module, layers: int, flush: bool = True) -> None:
        self.model = model
        self.flush = flush  # False: the "lean" variant without gc.collect()/empty_cache after every pass
        self.names = targetable_modules(layers)
        self.param_to_module = {}
        for name in self.names:
            prefix = original_to_diffusers(name)
            for pname, _ in model.get_submodule(prefix).named_parameters():
                self.param_to_module[f"{prefix}.{pname}"] = name
        self.accum = {n: 0.0 for n in self.names}
        self.count = {n: 0 for n in self.names}

    def group_batch(self, group: str, batch, t, noise) -> None:
        active = {n for n in self.names if category_of(n).value == group}
        for pname, param in self.model.named_parameters():
            param.requires_grad_(self.param_to_module.get(pname) in active)
        try:
            x0 = batch.target_latents
            tt = t.to(x0.device, x0.dtype)
            xt = tt.view(-1, 1, 1) * noise + (1 - tt.view(-1, 1, 1)) * x0
            xt.requires_grad_(True)
            pred = self.model(hidden_states=xt, timestep=tt, timestep_r=tt,
                              encoder_hidden_states=batch.encoder_hidden_states,
                              context_latents=batch.context_latents).sample
            loss = F.mse_loss(pred.float(), (noise - x0).float())
            loss.backward()
            with torch.no_grad():
                for pname, param in self.model.named_parameters():
                    module = self.param_to_module.get(pname)
                    if param.grad is not None and module in active:
                        self.accum[module] += param.grad.detach().float().pow(2).sum().item()
                        self.count[module] += param.grad.numel()
        finally:
            self.model.zero_grad(set_to_none=True)
            for param in self.model.parameters():
                param.requires_grad_(False)
            if self.flush:
                gc.collect()
                if x0.device.type == "cuda":
                    torch.cuda.empty_cache()

    def batch(self, batch, t, noise) -> None:
        for group in self.GROUPS:
            self.group_batch(group, batch, t, noise)

    def scores(self) -> np.ndarray:
        return np.array([self.accum[n] / self.count[n] if self.count[n] else 0.0 for n in self.names])


# ---- our arm ---------------------------------------------------------------------------------------


class Ours:
    """The production engine plus the per-batch convergence check the product does."""

    def __init__(self, model: torch.nn.Module, layers: int, rank_max: int, seed: int, sketch: bool = True) -> None:
        k = rank_max + 16 if sketch else 0
        self.engine = FisherEngine(model, targetable_modules(layers), sketch_k=k, seed=seed)
        self.tracker = ConvergenceTracker(patience=10**6, threshold=0.98)  # never stops: same batch count
        self.batches = 0

    def __enter__(self) -> "Ours":
        self.engine.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.__exit__(*exc)

    def batch(self, batch, t, noise) -> None:
        self.engine.step(batch, t, noise)
        self.batches += 1
        self.tracker.update(self.engine.fisher_sums() / self.engine.numel)

    def scores(self) -> np.ndarray:
        return self.engine.fisher_sums() / (self.engine.numel * self.batches)


class Plain:
    """A bare forward+backward with the target weights requiring grad and no hooks: the floor any engine pays."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        modules = dict(model.named_modules())
        self.model = model
        self.weights = [modules[original_to_diffusers(n)].weight for n in targetable_modules(layers)]

    def batch(self, batch, t, noise) -> None:
        self.model.requires_grad_(False)
        for w in self.weights:
            w.requires_grad_(True)
        flow_matching_loss(self.model, batch, t, noise).backward()
        for w in self.weights:
            w.grad = None
        self.model.requires_grad_(False)


# ---- measurements ----------------------------------------------------------------------------------


def _time_both(args: argparse.Namespace, model, batches) -> dict:
    """Interleaved timing: warm-up on batch 0, then for each batch ours, ours without the sketch, the
    reference and the lean reference."""
    device = next(model.parameters()).device
    ours_s, ref_s, lean_s, bare_s, plain_s = [], [], [], [], []
    plain = Plain(model, args.layers)
    with Ours(model, args.layers, args.rank_max, args.seed) as ours:
        ours.batch(*batches[0])
    Reference(model, args.layers).batch(*batches[0])
    reference, lean = Reference(model, args.layers), Reference(model, args.layers, flush=False)
    with Ours(model, args.layers, args.rank_max, args.seed) as ours:
        for batch in batches[1:]:
            ours_s.append(_timed(device, ours.batch, batch))
            ours.engine.__exit__()  # the reference arms set requires_grad themselves
            with Ours(model, args.layers, args.rank_max, args.seed, sketch=False) as bare:
                bare_s.append(_timed(device, bare.batch, batch))
            plain_s.append(_timed(device, plain.batch, batch))
            ref_s.append(_timed(device, reference.batch, batch))
            lean_s.append(_timed(device, lean.batch, batch))
            ours.engine.__enter__()
        ours_scores = ours.scores()
    ref_scores = reference.scores()
    rel = np.abs(ours_scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-30)
    ours_t, ref_t, lean_t, bare_t, plain_t = (float(np.median(x)) for x in (ours_s, ref_s, lean_s, bare_s, plain_s))
    return {
        "ours_s_per_batch": ours_t,
        "reference_s_per_batch": ref_t,
        "speedup": ref_t / ours_t,
        "reference_lean_s_per_batch": lean_t,
        "speedup_vs_lean": lean_t / ours_t,
        "ours_without_sketch_s_per_batch": bare_t,
        "sketch_overhead": ours_t / bare_t - 1.0,  # issue target: at most 0.15
        "plain_forward_backward_s_per_batch": plain_t,
        "ours_vs_plain_forward_backward": ours_t / plain_t,  # issue 18 target: at most 1.15 (Fisher + need hooks)
        "spearman_fisher": spearman(ours_scores, ref_scores),
        "max_rel_diff_fisher": float(rel.max()),
    }


def _timed(device: torch.device, fn, batch) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(*batch)
    _sync(device)
    return time.perf_counter() - start


def _worker(args: argparse.Namespace) -> None:
    """Measure one arm's peak memory over a few batches in this fresh process; print JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        model, batches = _setup(args, Path(tmp))
        device = next(model.parameters()).device
        _warm_up(model, *batches[0])  # lazy kernel/allocator setup must not count for either arm
        batches = batches[1: 1 + args.memory_batches]
        gc.collect()
        base = memory_now(device)
        reset_peak(device)
        if args.worker == "ours":
            with Ours(model, args.layers, args.rank_max, args.seed) as arm:
                for batch in batches:
                    arm.batch(*batch)
        else:
            arm = Reference(model, args.layers)
            for batch in batches:
                arm.batch(*batch)
        _sync(device)
        peak = peak_memory(device)
    print(json.dumps({"peak_bytes": peak - base, "kind": "cuda max_memory_allocated" if device.type == "cuda"
                      else "peak RSS delta"}))


def _warm_up(model: torch.nn.Module, batch, t, noise) -> None:
    """A forward+backward with every weight frozen (only x_t needs grad): neutral for both arms."""
    from sidestep.objective import flow_matching_loss

    flow_matching_loss(model, batch, t, noise).backward()










def _memory(args: argparse.Namespace, arm: str) -> dict:
    argv = [sys.executable, __file__, "--worker", arm, "--device", args.device, "--layers", str(args.layers),
            "--hidden", str(args.hidden), "--frames", str(args.frames), "--batches", str(args.memory_batches + 1),
            "--rank-max", str(args.rank_max), "--seed", str(args.seed)] + (["--real-size"] if args.real_size else [])
    if args.threads:
        argv += ["--threads", str(args.threads)]
    # A fixed mmap threshold makes glibc hand big tensor blocks back to the kernel at free, so RSS tracks live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"memory worker {arm} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the fp32-modules notice on .to(dtype) is noise here
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, batches = _setup(args, Path(tmp))
        timing = _time_both(args, model, batches)
    del model, batches
    ours_mem, ref_mem = _memory(args, "ours"), _memory(args, "reference")
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "threads": torch.get_num_threads(),
        "model": {"layers": args.layers, "hidden": args.hidden, "latent_frames": args.frames, "real_size": args.real_size,
                  "targets": 11 * args.layers, "gradient_checkpointing": True},
        "timed_batches": args.batches,
        "sketch_k": args.rank_max + 16,
        **timing,
        "ours_peak_bytes": ours_mem["peak_bytes"],
        "reference_peak_bytes": ref_mem["peak_bytes"],
        "peak_memory_kind": ours_mem["kind"],
        "memory_not_higher": ours_mem["peak_bytes"] <= ref_mem["peak_bytes"],
        "targets_met": timing["speedup"] >= 2.5 and timing["spearman_fisher"] > 0.99
        and ours_mem["peak_bytes"] <= ref_mem["peak_bytes"],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
