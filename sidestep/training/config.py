"""TrainConfig: every training choice in one frozen dataclass, validated once at construction."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sidestep.errors import ConfigError

__all__ = ["AdapterKind", "OptimizerKind", "SchedulerKind", "InitMode", "TrainConfig", "TARGET_GROUPS",
           "parse_target_modules"]


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


@dataclass(frozen=True)
class TrainConfig:
    """A training run. `alpha` None resolves to 2·rank; `timestep_mode` None to the variant's default."""

    dataset_dir: Path
    output_dir: Path
    rank: int = field(default=64, metadata={"help": "LoRA rank of every adapted module (flat mode)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default 2 x rank."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: tuple[str, ...] = TARGET_GROUPS
    adapter: AdapterKind = AdapterKind.LORA
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    weight_decay: float = 0.01
    scheduler: SchedulerKind = SchedulerKind.COSINE
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup, in optimizer steps."})
    epochs: int = 50
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 disables."})
    seed: int = 0
    save_every: int = field(default=10, metadata={"help": "Checkpoint every N epochs; 0 = only the final adapter."})
    resume: str | None = field(default=None, metadata={"help": "A checkpoint folder, or 'latest'."})
    ignore_fisher_map: bool = False
    cfg_dropout: float = 0.15
    timestep_mode: str | None = None
    max_latent_length: int | None = field(default=None, metadata={"help": "Random crop to this many frames."})
    init: InitMode = InitMode.DEFAULT
    spike_factor: float = field(default=10.0, metadata={"help": "Stop when loss > factor x its EMA; 0 disables."})
    overwrite: bool = False
    sample_every: int = field(default=0, metadata={"help": "Render audio samples every N steps; 0 = never."})
    sample_prompts: Path | None = field(default=None, metadata={"help": "TOML/JSON prompts for the samples."})
    sample_steps: int | None = field(default=None, metadata={"help": "Sampling steps; default by variant."})

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("dataset_dir", Path(self.dataset_dir))
        set_("output_dir", Path(self.output_dir))
        set_("target_modules", parse_target_modules(self.target_modules))
        for name, enum, flag in (("adapter", AdapterKind, "--adapter"), ("optimizer", OptimizerKind, "--optimizer"),
                                 ("scheduler", SchedulerKind, "--scheduler"), ("init", InitMode, "--init")):
            set_(name, _choice(getattr(self, name), enum, flag))
        _positive_int(self.rank, "--rank")
        if self.alpha is None:
            set_("alpha", float(2 * self.rank))
        _positive(self.alpha, "--alpha")
        _fraction(self.dropout, "--dropout")
        _fraction(self.cfg_dropout, "--cfg-dropout")
        _positive(self.lr, "--lr")
        for value, flag in ((self.epochs, "--epochs"), (self.batch_size, "--batch-size"), (self.grad_accum, "--grad-accum")):
            _positive_int(value, flag)
        for value, flag in ((self.max_steps, "--max-steps"), (self.max_latent_length, "--max-latent-length")):
            if value is not None:
                _positive_int(value, flag)
        for value, flag in ((self.warmup_steps, "--warmup-steps"), (self.save_every, "--save-every")):
            if not isinstance(value, int) or value < 0:
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

    def _check_optimizer(self) -> None:
        if self.optimizer is OptimizerKind.ADAMW8BIT and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes`, or use adamw.")
        if self.optimizer is OptimizerKind.PRODIGY:
            if importlib.util.find_spec("prodigyopt") is None:
                raise ConfigError("--optimizer prodigy needs prodigyopt: `pip install prodigyopt`, or use adamw.")
            if self.lr < 0.1:
                raise ConfigError(f"--optimizer prodigy finds its own step size; --lr is its multiplier: pass --lr 1.0 "
                                  f"(got {self.lr:g}).")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (paths and enums as strings), for run.json and training_state.pt."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, Enum):
                out[key] = value.value
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


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
