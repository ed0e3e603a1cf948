"""Benchmark: what audio samples during training cost, as a share of training time, and their peak memory.

Two real `sidestep.training.run.train` runs on the same synthetic checkpoint (DiT, VAE, text encoder written
with the test builders at the chosen size) and dataset, each in a fresh subprocess so peak memory is its own:
`plain` (no samples) and `sampled` (`--sample-every`, one prompt). Reported: seconds per training step,
seconds per sampling round (the first one also loads the VAE/encoders), the measured share of the sampled
run's loop time, and the share at a documented realistic setting:

    REALISTIC: one 30 s prompt every 250 steps, at the variant's default sampling steps (base: 50 with
    guidance, i.e. 100 DiT passes), training batch 1 on 30 s crops (750 latent frames).

The realistic share is extrapolated from the measured step and round times: a round costs about
sample_steps × 2 (guidance) DiT passes over duration × 25 frames plus one VAE decode, so the measured round
is scaled by steps and prompt length (the VAE part with it: an overestimate), the step by crop length, and
share = round / (every × step + round). With `--real-size --frames 750 --duration 30 --sample-steps 50` on
the GPU the scale factors are 1 and the share is measured, not extrapolated.

    .venv/bin/python bench/sampling.py --quick        # seconds; or `bench/train.py --sampling`
    .venv/bin/python bench/sampling.py --device cuda --real-size --frames 750 --duration 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import memory_now, peak as peak_memory, reset_peak  # bench/memory.py (bench/ is on sys.path)

from sidestep.models import find_model, resolve_runtime
from sidestep.models.select import ModelChoice
from sidestep.testing.tiny import tiny_config, write_dataset, write_original_checkpoint
from sidestep.testing.tiny_audio import write_tiny_text_encoder, write_tiny_vae
from sidestep.training.config import TrainConfig
from sidestep.training.events import SamplesSaved, Started
from sidestep.training.run import train

__all__ = ["sampling_report", "REALISTIC"]

REALISTIC = {"every": 250, "duration_s": 30.0, "sample_steps": 50, "guidance": True, "train_frames": 750}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 layers, hidden 64, 64 frames, 6 steps, 2 s prompt.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None)
    p.add_argument("--real-size", action="store_true", help="The 2B DiT (24 layers, hidden 2048).")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--frames", type=int, default=256, help="Training crop, latent frames (25 per second).")
    p.add_argument("--steps", type=int, default=12, help="Training steps per run.")
    p.add_argument("--every", type=int, default=6, help="--sample-every of the sampled run.")
    p.add_argument("--duration", type=float, default=10.0, help="Seconds of the sample prompt.")
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("plain", "sampled"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.frames, args.steps, args.every, args.duration = 4, 64, 64, 6, 3, 2.0
    if args.real_size:
        args.layers, args.hidden = 24, 2048
    return args


def _config(args: argparse.Namespace) -> dict:
    if args.real_size:
        return tiny_config(24, 2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                           head_dim=128, sliding_window=128, text_hidden_dim=1024)
    return tiny_config(args.layers, args.hidden)


def _setup(args: argparse.Namespace, root: Path) -> None:
    """Checkpoint, VAE (real sample rate and hop; shrunk channels), text encoder and dataset under `root`."""
    cfg = _config(args)
    write_original_checkpoint(root / "checkpoints", cfg, seed=args.seed)
    write_tiny_vae(root / "checkpoints" / "vae", args.seed)
    write_tiny_text_encoder(root / "checkpoints" / "Qwen3-Embedding-0.6B", cfg["text_hidden_dim"], args.seed)
    write_dataset(root / "dataset", count=4, encoder_width=cfg.get("encoder_hidden_size") or cfg["hidden_size"],
                  seed=args.seed, lengths=(args.frames, args.frames))
    prompt = {"name": "probe", "prompt": "warm synth pads, slow", "duration": args.duration, "seed": 1}
    (root / "prompts.json").write_text(json.dumps([prompt]), encoding="utf-8")


def _worker(args: argparse.Namespace) -> None:
    root = args.root
    runtime = resolve_runtime(args.device, args.precision, None)
    choice = ModelChoice(find_model(root / "checkpoints", "base"), root / "checkpoints", {})
    sampled = args.worker == "sampled"
    extra = dict(sample_every=args.every, sample_prompts=root / "prompts.json", sample_steps=args.sample_steps) if sampled else {}
    config = TrainConfig(root / "dataset", root / args.worker, rank=16, max_steps=args.steps, warmup_steps=0,
                         save_every=0, seed=args.seed, ignore_fisher_map=True, overwrite=True, **extra)
    marks: dict[str, float] = {}
    rounds: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, Started):
            marks["loop"] = time.perf_counter()
        elif isinstance(event, SamplesSaved):
            rounds.append(event.seconds)

    base = memory_now(runtime.device)
    reset_peak(runtime.device)
    train(config, choice, runtime, on_event)
    loop = time.perf_counter() - marks["loop"]  # includes the final save, in both arms alike
    print(json.dumps({"loop_s": loop, "rounds_s": rounds, "peak_bytes": peak_memory(runtime.device) - base}))


def _run(argv: list[str], arm: str, root: Path) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # RSS tracks live memory (see bench/train.py)
    proc = subprocess.run([sys.executable, __file__, *argv, "--root", str(root), "--worker", arm],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"sampling worker {arm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sampling_report(argv: list[str]) -> dict:
    """Both runs, and the measured and realistic shares of training time spent sampling."""
    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="sidestep-bench-sampling-") as tmp:
        root = Path(tmp)
        _setup(args, root)
        plain, sampled = _run(argv, "plain", root), _run(argv, "sampled", root)
    step = plain["loop_s"] / args.steps
    later = sampled["rounds_s"][1:] or sampled["rounds_s"]
    round_s = sum(later) / len(later)
    # Scale the measured round to the realistic prompt: DiT passes grow with steps x CFG and with frames.
    passes = REALISTIC["sample_steps"] / args.sample_steps  # both on base with guidance: 2 DiT passes a step
    frames = REALISTIC["duration_s"] / args.duration
    step_frames = REALISTIC["train_frames"] / args.frames
    realistic_round = round_s * passes * frames
    realistic_step = step * step_frames
    share = realistic_round / (REALISTIC["every"] * realistic_step + realistic_round)
    return {
        "benchmark": "sampling during training: cost and peak memory",
        "model": {"layers": args.layers, "hidden": _config(args)["hidden_size"], "train_frames": args.frames},
        "sampled_run": {"every": args.every, "prompt_seconds": args.duration, "sample_steps": args.sample_steps,
                        "guidance": "base default (7)"},
        "step_s": round(step, 4),
        "round_s": {"first_with_loading": round(sampled["rounds_s"][0], 3), "later_mean": round(round_s, 3)},
        "share_measured": round(sum(sampled["rounds_s"]) / sampled["loop_s"], 4),
        "realistic": {**REALISTIC, "share_extrapolated": round(share, 4),
                      "note": "linear scaling of the measured round and step by DiT passes and frames"},
        "peak_mem_mb": {"plain": round(plain["peak_bytes"] / 2**20, 1), "sampled": round(sampled["peak_bytes"] / 2**20, 1)},
        "memory_note": "CUDA max_memory_allocated delta" if args.device.startswith("cuda") else "peak RSS delta",
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker:
        _worker(args)
        return
    print(json.dumps(sampling_report(argv), indent=2))


if __name__ == "__main__":
    main()
