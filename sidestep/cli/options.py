"""Every shared command-line option, defined once: commands annotate parameters with these aliases.

Keep this a flat list. Defaults that come from settings are `None` here and resolved by
`sidestep.settings.resolve`, which also reports where each value came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sidestep.analysis.fisher_map import ADVISED_LR

# The help panels every command groups its options into (`rich_help_panel=`), so --help reads at 80 columns.
COMMON = "Common"
SCHEDULE = "Schedule"
MEMORY = "Memory"
CHECKPOINTS = "Validation & checkpoints"
ADVANCED = "Advanced"
PANEL_ORDER = (COMMON, SCHEDULE, MEMORY, CHECKPOINTS, ADVANCED)

CheckpointDirOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", help="ACE-Step checkpoint folder (default: from settings).", show_default=False,
                 rich_help_panel=COMMON),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model variant or folder name: turbo, base, sft, xl-base, ... (default: from settings).",
        show_default=False, rich_help_panel=COMMON
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="Compute device: auto, cpu, cuda, cuda:N or mps (default: from settings).", show_default=False,
        rich_help_panel=MEMORY
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision", help="Precision: auto, bf16, fp16 or fp32 (default: from settings).", show_default=False,
        rich_help_panel=MEMORY
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same result.",
                                      rich_help_panel=COMMON)]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Answer yes to every confirmation.", rich_help_panel=COMMON)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, nothing else there.",
                                       rich_help_panel=COMMON)]
BaseVariantOpt = Annotated[
    str | None,
    typer.Option("--base-variant", help="For a fine-tune: the official variant it descends from (turbo, base, sft, ...).",
                 show_default=False, rich_help_panel=ADVANCED),
]

# ---- Preprocessing++ (`sidestep analyze`, shared with train where the meaning is the same) ----
DatasetDirOpt = Annotated[
    Path | None,
    typer.Option("--dataset-dir", help="Folder of preprocessed .pt files (required).", show_default=False,
                 rich_help_panel=COMMON),
]
TimestepFocusOpt = Annotated[
    str,
    typer.Option("--timestep-focus", help="balanced, texture (t in 0..0.4), structure (t in 0.6..1) or a range LOW,HIGH.",
                 rich_help_panel=COMMON),
]
RankOpt = Annotated[int, typer.Option("--rank", help="Target median LoRA rank (with --budget flat: the flat rank whose "
                                                     "parameter count is spent).", rich_help_panel=COMMON)]
RankMinOpt = Annotated[int, typer.Option("--rank-min", help="Smallest rank of any adapted module.",
                                         rich_help_panel=COMMON)]
RankMaxOpt = Annotated[Optional[int], typer.Option("--rank-max", help="Largest rank of any adapted module "
                                                   "(default 128; under --budget flat 4 x --rank when that is more).",
                                                   show_default=False, rich_help_panel=COMMON)]
ConvergencePatienceOpt = Annotated[
    int, typer.Option("--convergence-patience", help="Stop a run once its module ranking is stable for N batches.",
                      rich_help_panel=SCHEDULE)
]
RunsOpt = Annotated[
    int | None,
    typer.Option("--runs", help="Estimation runs (default: 2 for up to 10 samples, else 3).", show_default=False,
                 rich_help_panel=SCHEDULE),
]
BatchesPerRunOpt = Annotated[
    int | None,
    typer.Option("--batches-per-run", help="Batches per run (default: each sample once, at most 50).", show_default=False,
                 rich_help_panel=SCHEDULE),
]
MapOutputOpt = Annotated[
    Path | None,
    typer.Option("--output", help="Where to write the map (default: <dataset-dir>/fisher_map.json).", show_default=False,
                 rich_help_panel=COMMON),
]
BudgetOpt = Annotated[
    str, typer.Option("--budget", help="median (the reference's rule): the median rank is --rank; flat: total "
                                       "adapter parameters equal a flat LoRA at --rank on every module (the map the "
                                       "planted benchmark measures best when --rank-max is at least 4 x --rank, its "
                                       "default there).",
                      rich_help_panel=ADVANCED)
]
AlphaRatioOpt = Annotated[float, typer.Option("--alpha-ratio", help="LoRA alpha = ratio × rank.",
                                              rich_help_panel=ADVANCED)]
RankSignalOpt = Annotated[
    str, typer.Option("--rank-signal", help="What selects and sizes the modules: probe (default: each module's "
                                            "share of a short LoRA probe's loss fall; the only one that wins on "
                                            "the planted benchmark; under --budget flat its ranks grow with the "
                                            "log of the share), need (noise-free mean gradient; water-filling under "
                                            "--budget flat), data (gradient sketch rank), fisher (score only), "
                                            "weight (reference's weight SVD) or grad-energy.",
                                            rich_help_panel=ADVANCED)
]
ProbeStepsOpt = Annotated[int, typer.Option("--probe-steps", help="--rank-signal probe: training steps of the probe.",
                                             rich_help_panel=ADVANCED)]
ProbeLrOpt = Annotated[float, typer.Option("--probe-lr", help="--rank-signal probe: the probe's learning rate (Adam; "
                                           "retried once at a tenth if the probe does not learn).",
                                           rich_help_panel=ADVANCED)]
ProbeRepeatsOpt = Annotated[int, typer.Option("--probe-repeats", help="--rank-signal probe: average this many "
                                             "independent probes, so the map depends less on --seed (costs that "
                                             "many probes; not a better map).", rich_help_panel=ADVANCED)]
AllowTurboOpt = Annotated[
    bool, typer.Option("--allow-turbo", help="Analyse a turbo model anyway (Preprocessing++ can destabilise turbo training).",
                       rich_help_panel=ADVANCED)
]
GradientCheckpointingOpt = Annotated[
    bool | None,
    typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                 help="Recompute activations to save memory (default: on for GPUs, off on CPU).", show_default=False,
                 rich_help_panel=MEMORY),
]
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Leave unreadable samples out (and list them) instead of stopping.",
                                          rich_help_panel=ADVANCED)]
WeightRankOpt = Annotated[
    bool, typer.Option("--weight-rank/--no-weight-rank", help="Also measure each weight's effective rank (an SVD per module).",
                       rich_help_panel=ADVANCED)
]

# ---- training and export (`sidestep train`, `sidestep export`) ----
OutputDirOpt = Annotated[
    Path | None,
    typer.Option("--output-dir", help="Where checkpoints/, final/ and run.json go (required).", show_default=False,
                 rich_help_panel=COMMON),
]
AdapterRankOpt = Annotated[int, typer.Option("--rank", help="LoRA rank of every adapted module (a fisher_map.json overrides it).",
                                             rich_help_panel=COMMON)]
AlphaOpt = Annotated[
    float | None, typer.Option("--alpha", help="LoRA alpha (default: 2 × rank); strength = alpha / rank.", show_default=False,
                               rich_help_panel=ADVANCED)
]
DropoutOpt = Annotated[float, typer.Option("--dropout", help="Dropout on the adapter's input, 0..1.",
                                           rich_help_panel=ADVANCED)]
TargetModulesOpt = Annotated[
    str, typer.Option("--target-modules", help="Comma-separated groups (self-attn, cross-attn, mlp) or module names "
                                               "(q_proj, cross_attn.k_proj, layers.3.mlp.up_proj).",
                                               rich_help_panel=ADVANCED)
]
AdapterKindOpt = Annotated[str, typer.Option("--adapter", help="Adapter type: lora, dora, lokr or loha (via peft).",
                                             rich_help_panel=COMMON)]
LrOpt = Annotated[
    float | None,
    typer.Option("--lr", help=f"Peak learning rate (default: 1e-4; {ADVISED_LR} with a Preprocessing++ map; 1.0 for "
                              "prodigy).", show_default=False, rich_help_panel=COMMON),
]
OptimizerOpt = Annotated[
    str, typer.Option("--optimizer", help="adamw, adamw8bit (needs bitsandbytes) or prodigy (needs prodigyopt; --lr 1.0).",
                      rich_help_panel=SCHEDULE)
]
SchedulerOpt = Annotated[str, typer.Option("--scheduler", help="Learning-rate schedule after warmup: cosine, constant or linear.",
                                           rich_help_panel=SCHEDULE)]
WarmupStepsOpt = Annotated[
    int | None,
    typer.Option("--warmup-steps", help="Linear warmup, in optimizer steps (default: 5% of the run, at most 100).",
                 show_default=False, rich_help_panel=SCHEDULE),
]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the dataset (--max-steps, when given, wins).",
                                        rich_help_panel=SCHEDULE)]
MaxStepsOpt = Annotated[
    int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps.", show_default=False,
                             rich_help_panel=SCHEDULE)
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Samples per micro-batch (1 is exact; more pads).",
                                           rich_help_panel=MEMORY)]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.",
                                           rich_help_panel=MEMORY)]
MaxGradNormOpt = Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping norm; 0 disables.",
                                               rich_help_panel=SCHEDULE)]
SaveEveryOpt = Annotated[int, typer.Option("--save-every", help="Save a resumable checkpoint every N epochs; 0 = only at the end.",
                                           rich_help_panel=CHECKPOINTS)]
ResumeOpt = Annotated[
    str | None,
    typer.Option("--resume", help="Continue from a checkpoint folder, or 'latest' under --output-dir.", show_default=False,
                 rich_help_panel=CHECKPOINTS),
]
IgnoreFisherMapOpt = Annotated[
    bool, typer.Option("--ignore-fisher-map", help="Train a flat adapter even if the dataset has a fisher_map.json.",
                       rich_help_panel=ADVANCED)
]
CfgDropoutOpt = Annotated[float, typer.Option("--cfg-dropout", help="Probability of replacing the condition by the null condition.",
                                              rich_help_panel=ADVANCED)]
TimestepModeOpt = Annotated[
    str | None,
    typer.Option("--timestep-mode", help="continuous (logit-normal; default for base/sft) or discrete (turbo 8-step "
                                         "schedule; default for turbo).", show_default=False, rich_help_panel=ADVANCED),
]
MaxLatentLengthOpt = Annotated[
    int | None,
    typer.Option("--max-latent-length", help="Random crop to this many latent frames (25 per second) to bound memory.",
                 show_default=False, rich_help_panel=MEMORY),
]
InitOpt = Annotated[str, typer.Option("--init", help="Adapter init: default (peft's random A), or gradient (LoRA A from the top gradient directions that `sidestep analyze` stored in fisher_init.safetensors).",
                                      rich_help_panel=ADVANCED)]
SpikeFactorOpt = Annotated[
    float, typer.Option("--spike-factor", help="Stop when the loss exceeds this × its running average; 0 disables.",
                        rich_help_panel=SCHEDULE)
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing result (a trained adapter is kept as .bak).",
                                            rich_help_panel=COMMON)]
ExportFormatOpt = Annotated[
    str | None, typer.Option("--format", help="comfyui, diffusers or peft (ACE-Step's own).", show_default=False,
                             rich_help_panel=COMMON)
]
NoInitOpt = Annotated[
    bool, typer.Option("--no-init", help="Do not write fisher_init.safetensors (the bases `sidestep train --init "
                                         "gradient` starts LoRA from).", rich_help_panel=ADVANCED)
]

# ---- listening (`sidestep train` samples)
SampleEveryOpt = Annotated[
    int, typer.Option("--sample-every", help="Render audio samples every N steps (and at step 0 and the end); 0 = never.",
                      rich_help_panel=CHECKPOINTS)
]
SamplePromptsOpt = Annotated[
    Path | None,
    typer.Option("--sample-prompts", help="A .toml or .json prompts file, as for `sidestep generate` (default: "
                                          "a dataset caption).", show_default=False, rich_help_panel=CHECKPOINTS),
]
SampleStepsOpt = Annotated[
    int | None,
    typer.Option("--sample-steps", help="Sampling steps per sample (default: 8 for turbo, 50 for base/sft).",
                 show_default=False, rich_help_panel=CHECKPOINTS),
]

# ---- records, validation, checkpoints and recipes (`sidestep train`; --config/--preset also `sidestep analyze`)
SaveEveryStepsOpt = Annotated[
    int, typer.Option("--save-every-steps", help="Also save a resumable checkpoint every N optimizer steps; 0 = off.",
                      rich_help_panel=CHECKPOINTS)
]
KeepLastOpt = Annotated[
    int, typer.Option("--keep-last", help="Keep only the newest K checkpoints/step-N (older ones are removed once a "
                                          "newer one is complete); 0 = keep all.", rich_help_panel=CHECKPOINTS)
]
ValSplitOpt = Annotated[
    float, typer.Option("--val-split", help="Hold out this share of the dataset's files (seeded) to measure a "
                                            "validation loss; best/ keeps the adapter where it was lowest.",
                        rich_help_panel=CHECKPOINTS)
]
ValDirOpt = Annotated[
    Path | None,
    typer.Option("--val-dir", help="A folder of preprocessed files to validate on (instead of --val-split).",
                 show_default=False, rich_help_panel=CHECKPOINTS),
]
ValEveryOpt = Annotated[
    int | None,
    typer.Option("--val-every", help="Measure the validation loss every N steps (default: once per epoch, and at "
                                     "the end).", show_default=False, rich_help_panel=CHECKPOINTS),
]
ReportToOpt = Annotated[
    str, typer.Option("--report-to", help="Also log metrics to none, tensorboard or wandb (optional extras: pip install "
                                          "tensorboard, or wandb); metrics.csv is always written.",
                      rich_help_panel=ADVANCED)
]
ConfigFileOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Read options from a TOML or JSON file (a previous run's run.json works too); "
                                  "flags on the command line win.", show_default=False, rich_help_panel=COMMON),
]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="Start from a preset (recommended, quick-test, high-quality, low-vram-8gb, ..., or "
                                  "your own from the wizard); --config and flags win.", show_default=False,
                 rich_help_panel=COMMON),
]
