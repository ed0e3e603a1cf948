"""Quality benchmark: does Preprocessing++ make better adapters at the same parameter budget? (issue 10)

A tiny model of the real ACE-Step DiT is pretrained with the project's flow-matching objective on a synthetic
base distribution (cached in .bench-cache/quality/); each task shifts that distribution (timbre, rhythm,
condition mapping) and is written as real `.pt` files. Every arm is fine-tuned with the project's own
`train()` at the same parameter count as flat LoRA (±1%), the same steps, seeds and learning-rate sweep;
the best LR on validation is reported on test, with forgetting measured on held-out base samples.

    python bench/quality.py                  # default: tasks 0,1,2 × 3 seeds × 3 LRs, every arm, ~18 min
    python bench/quality.py --quick          # CI smoke: tiny sizes, 1 task, 1 seed, 1 LR (< 2 min)
    python bench/quality.py --task-seed 5    # another task of the same kind

Budget: --rank 4, --rank-min 1, --rank-max 8 (the product's 64/16/128 scaled to hidden 128); the maps analysed
under --budget flat get --flat-rank-max, by default 4 × --rank as `sidestep analyze --budget flat` does.

stdout: one JSON line per arm × seed × task, then one summary JSON line (also written to --out FILE).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_lib.arms import ARM_ORDER, Budget  # noqa: E402
from quality_lib.base_model import MODEL_FOLDER, BaseSpec, ensure_base  # noqa: E402
from quality_lib.cli import finish, parse_with_preset  # noqa: E402
from quality_lib.report import markdown_table, summarize  # noqa: E402
from quality_lib.runner import CellConfig, prepare_task, run_cell, skipped_arms  # noqa: E402

from sidestep.analysis.config import AnalysisConfig  # noqa: E402
from sidestep.models import find_model, load_model, resolve_runtime  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIGNAL = AnalysisConfig(dataset_dir=Path(".")).rank_signal.value
PRESETS = {
    "default": dict(task_seed="0,1,2", seeds=3, layers=4, hidden=128, pretrain_steps=1500, train_samples=20,
                    val_samples=8, test_samples=16, base_samples=16, eval_draws=6, steps=100, batch_size=4,
                    warmup=10, lrs="3e-4,1e-3,3e-3", rank=4, rank_min=1, rank_max=8, rank_step=1),
    "quick": dict(task_seed="0", seeds=1, layers=2, hidden=64, pretrain_steps=100, train_samples=10,
                  val_samples=4, test_samples=4, base_samples=4, eval_draws=4, steps=15, batch_size=2,
                  warmup=2, lrs="1e-3", rank=4, rank_min=2, rank_max=16, rank_step=2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke preset (tiny sizes, 1 seed, 1 LR)")
    p.add_argument("--task-seed", default=None, help="task(s), comma-separated (default 0,1,2; --quick: 0)")
    p.add_argument("--arms", default=",".join(ARM_ORDER), help="arms to run, comma-separated (flat is always run)")
    p.add_argument("--rank-signal", default=None, help="our map's rank signal (default: the tool's default, "
                   "probe): probe|data|need|fisher|grad-energy|weight")
    p.add_argument("--probe-repeats", type=int, default=1, help="independent probes averaged by our maps' "
                   "analysis (the tool's --probe-repeats; default 1)")
    p.add_argument("--focus", default="balanced", help="analysis timestep focus: balanced|texture|structure|LOW,HIGH")
    p.add_argument("--inclusion", type=float, default=0.55, help="fraction of modules our maps select by Fisher")
    p.add_argument("--out", type=Path, help="also write the full result JSON here")
    p.add_argument("--markdown", type=Path, help="write the result table as markdown here")
    p.add_argument("--cache", type=Path, default=REPO / ".bench-cache" / "quality", help="pretrained base cache")
    p.add_argument("--workdir", type=Path, help="keep datasets and adapters here (default: a temp dir)")
    p.add_argument("--base-seed", type=int, default=0, help="seed of the base law and pretraining")
    p.add_argument("--device", default="cpu", help="device for pretraining, analysis, training and evaluation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is the robust default: on a busy 2-core machine 2 threads run ~10x slower)")
    sizes = {"layers": int, "hidden": int, "pretrain-steps": int, "seeds": int, "train-samples": int,
             "val-samples": int, "test-samples": int, "base-samples": int, "eval-draws": int, "steps": int,
             "batch-size": int, "warmup": int, "lrs": str, "rank": int, "rank-min": int, "rank-max": int,
             "rank-step": int, "flat-rank-max": int}
    return parse_with_preset(p, sizes, PRESETS, argv)


def main(argv: list[str] | None = None, emit=print) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    arms = tuple(a for a in ARM_ORDER if a in set(args.arms.split(",")) | {"flat"})
    cfg = CellConfig(
        budget=Budget(args.rank, args.rank_min, args.rank_max, args.rank_step, flat_hi=args.flat_rank_max),
        steps=args.steps,
        batch_size=args.batch_size, warmup=args.warmup, lrs=tuple(float(x) for x in args.lrs.split(",")),
        n_train=args.train_samples, n_val=args.val_samples, n_test=args.test_samples, n_base_eval=args.base_samples,
        eval_draws=args.eval_draws, rank_signal=args.rank_signal or DEFAULT_SIGNAL, arms=arms, focus=args.focus,
        inclusion=args.inclusion, probe_repeats=args.probe_repeats)
    spec = BaseSpec(num_layers=args.layers, hidden=args.hidden, steps=args.pretrain_steps, seed=args.base_seed,
                    law_seed=args.base_seed)
    runtime = resolve_runtime(args.device, "fp32", False)
    base = ensure_base(args.cache, spec, log, device=runtime.device)
    loaded = load_model(find_model(base.root, MODEL_FOLDER, None), runtime)
    records, cells, tasks = [], [], []
    with tempfile.TemporaryDirectory(prefix="sidestep-quality-") as tmp:
        workdir = args.workdir or Path(tmp)
        for task_seed in (int(x) for x in args.task_seed.split(",")):
            task = prepare_task(base, loaded, task_seed, cfg, workdir)
            tasks.append({"task_seed": task_seed, "shift": task.shift.as_dict(),
                          "base_model_test_loss": task.base_model_test_loss,
                          "base_model_base_loss": task.base_model_base_loss})
            for seed in range(args.seeds):
                log(f"task {task_seed}, seed {seed}")
                cell_records, info = run_cell(task, seed, base, loaded, runtime, cfg, workdir, log)
                cells.append({"task_seed": task_seed, "seed": seed, **info})
                for rec in cell_records:
                    emit(json.dumps(rec))
                records.extend(cell_records)
    summary = summarize(records, cells, tasks)
    summary.update({
        "summary": True,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "budget": asdict(cfg.budget), "arms": list(arms)},
        "base_model": {**asdict(spec), "cached": base.cached, "pretrain_seconds": base.pretrain_seconds,
                       "final_pretrain_loss": base.final_loss},
        "skipped": skipped_arms(cfg),
        "wall_seconds": time.perf_counter() - started,
    })
    return finish(summary, records, cells, args, emit, log,
                  lambda: markdown_table(summary, " ".join(["python bench/quality.py", *(argv or sys.argv[1:])])))


if __name__ == "__main__":
    main()
