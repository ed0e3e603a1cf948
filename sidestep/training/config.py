"""TrainConfig: every training choice in one frozen dataclass, validated once at construction."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from sidestep.errors import ConfigError

__all__ = ["AdapterKind", "OptimizerKind", "SchedulerKind", "InitMode", "ReportTo", "TrainConfig", "TARGET_GROUPS",
           "PANELS", "Resolved", "resolve_auto", "parse_target_modules"]


class AdapterKind(str, Enum):
    LORA = "lora"
    DORA = "dora"  # LoRA with a learned per-output magnitude (peft `use_dora=True`)
    LOKR = "lokr"
    LOHA = "loha"


class OptimizerKind(str, Enum):
    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"  # bitsandbytes
    PRODIGY = "prodigy"  # prodigyopt; adapts its own step size, so --lr is a multiplier (1.0)


class SchedulerKind(str, Enum):
    COSINE = "cosine"
    CONSTANT = "constant"
    LINEAR = "linear"


class InitMode(str, Enum):
    DEFAULT = "default"  # peft's init: A random, B zero (the adapter starts as a no-op)
    GRADIENT = "gradient"  # LoRA A from the top gradient directions in fisher_init.safetensors (analyze)


TARGET_GROUPS = ("self_attn", "cross_attn", "mlp")
# Init modes this build can run (sidestep/training/grad_init.py implements `gradient`).
AVAILABLE_INITS: frozenset[InitMode] = frozenset({InitMode.DEFAULT, InitMode.GRADIENT})


def parse_target_modules(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`self-attn,mlp` or explicit names (`q_proj`, `cross_attn.to_k`, `layers.3.mlp.up_proj`) -> a tuple.

    Group names accept `-` or `_`; `all` means every group. Names are matched against the model later.
    """
    items = text.replace(",", " ").split() if isinstance(text, str) else [s.strip() for s in text]
    out: list[str] = []
    for item in items:
        norm = item.replace("-", "_")
        if norm == "all":
            out.extend(TARGET_GROUPS)
        elif norm in TARGET_GROUPS:
            out.append(norm)
        elif item:
            out.append(item)
    if not out:
        raise ConfigError("--target-modules is empty; use self-attn, cross-attn, mlp (comma-separated) or module names.")
    return tuple(dict.fromkeys(out))


PANELS = ("Common", "Schedule", "Memory", "Validation & checkpoints", "Advanced")
WARMUP_SHARE, WARMUP_MAX = 0.05, 100  # the default warmup: 5% of the planned steps, at most 100
DEFAULT_LR = 1e-4
PRODIGY_LR = 1.0  # prodigy finds its own step size; lr is its multiplier


class ReportTo(str, Enum):
    NONE = "none"  # metrics.csv only (always written)
    TENSORBOARD = "tensorboard"  # pip install sidestep[tensorboard]
    WANDB = "wandb"  # pip install sidestep[wandb]


def _f(default: Any, help: str, panel: str, **kwargs: Any) -> Any:
    assert panel in PANELS, panel
    return field(default=default, metadata={"help": help, "panel": panel}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Fields left None are "auto" and resolved once per run (`resolved`): alpha to 2·rank here,
    lr, warmup, timestep mode and validation interval when the plan and the step count are known."""

    dataset_dir: Path = field(metadata={"help": "Folder of preprocessed .pt files to train on.", "panel": "Common"})
    output_dir: Path = field(metadata={"help": "Where checkpoints/, final/, metrics.csv and run.json go.",
                                       "panel": "Common"})
    rank: int = _f(64, "LoRA rank of every adapted module (flat mode).", "Common")
    alpha: float | None = _f(None, "LoRA alpha; default 2 x rank.", "Common")
    dropout: float = _f(0.0, "Dropout on the adapter input.", "Advanced")
    target_modules: tuple[str, ...] = _f(TARGET_GROUPS, "Groups (self-attn, cross-attn, mlp) or module names.", "Common")
    adapter: AdapterKind = _f(AdapterKind.LORA, "Adapter type: lora, dora, lokr or loha.", "Common")
    lr: float | None = _f(None, f"Peak learning rate; default {DEFAULT_LR:g}, the advised one with a Preprocessing++ "
                                f"map, {PRODIGY_LR:g} for prodigy.", "Common")
    optimizer: OptimizerKind = _f(OptimizerKind.ADAMW, "adamw, adamw8bit or prodigy.", "Advanced")
    weight_decay: float = _f(0.01, "AdamW weight decay.", "Advanced")
    scheduler: SchedulerKind = _f(SchedulerKind.COSINE, "Learning-rate schedule after warmup.", "Schedule")
    warmup_steps: int | None = _f(None, f"Linear warmup, in optimizer steps; default {WARMUP_SHARE:.0%} of the run, "
                                        f"at most {WARMUP_MAX}.", "Schedule")
    epochs: int = _f(50, "Passes over the dataset (--max-steps, when given, wins).", "Common")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps.", "Schedule")
    batch_size: int = _f(1, "Samples per micro-batch.", "Memory")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", "Memory")
    max_grad_norm: float = _f(1.0, "Gradient clipping; 0 disables.", "Advanced")
    seed: int = _f(0, "Random seed; the same seed gives the same adapter.", "Common")
    save_every: int = _f(10, "Checkpoint every N epochs; 0 = only the final adapter.", "Validation & checkpoints")
    resume: str | None = _f(None, "A checkpoint folder, or 'latest'.", "Validation & checkpoints")
    ignore_fisher_map: bool = _f(False, "Train flat even when the dataset has a fisher_map.json.", "Advanced")
    cfg_dropout: float = _f(0.15, "Probability of training on the null condition.", "Advanced")
    timestep_mode: str | None = _f(None, "continuous or discrete; default by variant.", "Advanced")
    max_latent_length: int | None = _f(None, "Random crop to this many frames.", "Memory")
    init: InitMode = _f(InitMode.DEFAULT, "Adapter init: default or gradient.", "Advanced")
    spike_factor: float = _f(10.0, "Stop when loss > factor x its EMA; 0 disables.", "Advanced")
    overwrite: bool = _f(False, "Replace an existing result (kept as .bak).", "Common")
    sample_every: int = _f(0, "Render audio samples every N steps; 0 = never.", "Validation & checkpoints")
    sample_prompts: Path | None = _f(None, "TOML/JSON prompts for the samples.", "Validation & checkpoints")
    sample_steps: int | None = _f(None, "Sampling steps; default by variant.", "Validation & checkpoints")
    save_every_steps: int = _f(0, "Checkpoint every N optimizer steps; 0 = off.", "Validation & checkpoints")
    keep_last: int = _f(0, "Keep only the newest K step checkpoints; 0 = keep all.", "Validation & checkpoints")
    val_split: float = _f(0.0, "Hold out this share of the files (seeded) for validation; 0 = none.",
                          "Validation & checkpoints")
    val_dir: Path | None = _f(None, "A folder of preprocessed files to validate on.", "Validation & checkpoints")
    val_every: int | None = _f(None, "Validation loss every N steps; default once per epoch.",
                               "Validation & checkpoints")
    report_to: ReportTo = _f(ReportTo.NONE, "Also log to none, tensorboard or wandb (metrics.csv is always "
                                            "written).", "Advanced")

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("dataset_dir", Path(self.dataset_dir))
        set_("output_dir", Path(self.output_dir))
        set_("target_modules", parse_target_modules(self.target_modules))
        for name, enum, flag in (("adapter", AdapterKind, "--adapter"), ("optimizer", OptimizerKind, "--optimizer"),
                                 ("scheduler", SchedulerKind, "--scheduler"), ("init", InitMode, "--init"),
                                 ("report_to", ReportTo, "--report-to")):
            set_(name, _choice(getattr(self, name), enum, flag))
        _positive_int(self.rank, "--rank")
        if self.alpha is None:
            set_("alpha", float(2 * self.rank))
        _positive(self.alpha, "--alpha")
        _fraction(self.dropout, "--dropout")
        _fraction(self.cfg_dropout, "--cfg-dropout")
        if self.lr is not None:
            _positive(self.lr, "--lr")
        for value, flag in ((self.epochs, "--epochs"), (self.batch_size, "--batch-size"), (self.grad_accum, "--grad-accum")):
            _positive_int(value, flag)
        for value, flag in ((self.max_steps, "--max-steps"), (self.max_latent_length, "--max-latent-length")):
            if value is not None:
                _positive_int(value, flag)
        for value, flag in ((self.warmup_steps, "--warmup-steps"), (self.save_every, "--save-every"),
                            (self.save_every_steps, "--save-every-steps"), (self.keep_last, "--keep-last")):
            if value is None and flag == "--warmup-steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{flag} must be a whole number >= 0, got {value!r}.")
        for value, flag in ((self.max_grad_norm, "--max-grad-norm"), (self.spike_factor, "--spike-factor"),
                            (self.weight_decay, "weight_decay")):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{flag} must be >= 0 (0 disables), got {value!r}.")
        if self.timestep_mode not in (None, "continuous", "discrete"):
            raise ConfigError(f"--timestep-mode {self.timestep_mode!r}: use continuous or discrete.")
        if self.resume is not None and not str(self.resume).strip():
            raise ConfigError("--resume is empty; give a checkpoint folder or 'latest'.")
        self._check_sampling()
        self._check_validation()
        self._check_optimizer()
        if self.init not in AVAILABLE_INITS:
            raise ConfigError(f"--init {self.init.value} is not available yet in this version; use --init default.")
        if self.init is InitMode.GRADIENT and self.adapter in (AdapterKind.LOKR, AdapterKind.LOHA):
            raise ConfigError(f"--init gradient sets a LoRA/DoRA A matrix and does not apply to --adapter "
                              f"{self.adapter.value}; use --init default or --adapter lora/dora.")

    def _check_sampling(self) -> None:
        if isinstance(self.sample_every, bool) or not isinstance(self.sample_every, int) or self.sample_every < 0:
            raise ConfigError(f"--sample-every must be a whole number >= 0 (0 = no samples), got {self.sample_every!r}.")
        if self.sample_steps is not None:
            _positive_int(self.sample_steps, "--sample-steps")
        if self.sample_prompts is not None:
            object.__setattr__(self, "sample_prompts", Path(self.sample_prompts))
        if self.sample_every == 0 and (self.sample_prompts is not None or self.sample_steps is not None):
            flag = "--sample-prompts" if self.sample_prompts is not None else "--sample-steps"
            raise ConfigError(f"{flag} needs --sample-every N: how many steps apart the samples are rendered.")

    def _check_validation(self) -> None:
        if isinstance(self.val_split, bool) or not isinstance(self.val_split, (int, float)) \
                or not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"--val-split must be a share in [0, 1) of the files, e.g. 0.1; got {self.val_split!r}.")
        object.__setattr__(self, "val_split", float(self.val_split))
        if self.val_dir is not None:
            object.__setattr__(self, "val_dir", Path(self.val_dir))
            if self.val_split:
                raise ConfigError("--val-split and --val-dir both choose validation files; pass one of them.")
        if self.val_every is not None:
            _positive_int(self.val_every, "--val-every")
            if not self.validates:
                raise ConfigError("--val-every needs validation files: add --val-split 0.1 or --val-dir DIR.")

    @property
    def validates(self) -> bool:
        return bool(self.val_split) or self.val_dir is not None

    def _check_optimizer(self) -> None:
        if self.optimizer is OptimizerKind.ADAMW8BIT and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes`, or use adamw.")
        if self.optimizer is OptimizerKind.PRODIGY:
            if importlib.util.find_spec("prodigyopt") is None:
                raise ConfigError("--optimizer prodigy needs prodigyopt: `pip install prodigyopt`, or use adamw.")
            if self.lr is not None and self.lr < 0.1:
                raise ConfigError(f"--optimizer prodigy finds its own step size; --lr is its multiplier: pass --lr 1.0 "
                                  f"(got {self.lr:g}).")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (absolute paths and enums as strings), for run.json and training_state.pt."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value.absolute())
            elif key == "resume" and value not in (None, "latest"):
                out[key] = str(Path(value).expanduser().absolute())
            elif isinstance(value, Enum):
                out[key] = value.value
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


@dataclass(frozen=True)
class Resolved:
    """A config with every "auto" field filled in for one run, and what the run should say about it."""

    config: TrainConfig
    notices: tuple[str, ...] = ()


def resolve_auto(config: TrainConfig, total_steps: int, steps_per_epoch: int, adaptive: bool,
                 is_turbo: bool, advised_lr: float | str) -> Resolved:
    """Fill lr, warmup, timestep mode and the validation interval, once the plan and step count are known.

    Resolving a resolved config changes nothing, so run.json fed back as --config trains the same run.
    """
    notices = []
    lr = config.lr
    if lr is None:
        if config.optimizer is OptimizerKind.PRODIGY:
            lr = PRODIGY_LR
        elif adaptive:
            lr = float(advised_lr)
            notices.append(f"Learning rate {lr:g}: the rate advised with a Preprocessing++ map (no --lr given; "
                           f"pass --lr to choose another).")
        else:
            lr = DEFAULT_LR
    warmup = config.warmup_steps
    if warmup is None:
        warmup = min(WARMUP_MAX, round(WARMUP_SHARE * total_steps))
    elif warmup > total_steps:
        notices.append(f"--warmup-steps {warmup} is longer than this run ({total_steps} steps); warming up over "
                       f"{total_steps} steps instead.")
        warmup = total_steps
    mode = config.timestep_mode or ("discrete" if is_turbo else "continuous")
    val_every = config.val_every
    if val_every is None and config.validates:
        val_every = max(1, steps_per_epoch)
    out = replace(config, lr=lr, warmup_steps=warmup, timestep_mode=mode, val_every=val_every)
    return Resolved(out, tuple(notices))


def _choice(value: Any, enum: type[Enum], flag: str) -> Enum:
    try:
        return enum(value.value if isinstance(value, Enum) else value)
    except ValueError:
        valid = "|".join(e.value for e in enum)
        raise ConfigError(f"{flag} {value!r} is not one of {valid}.") from None


def _positive_int(value: Any, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}.")


def _positive(value: Any, flag: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag} must be a number > 0, got {value!r}.")


def _fraction(value: Any, flag: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{flag} must be in [0, 1), got {value!r}.")
