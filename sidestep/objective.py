"""The flow-matching objective, shared by analysis and training: one definition, never two.

Convention (ACE-Step 1.5): x_t = t·noise + (1−t)·x0, so t = 1 is pure noise; the model predicts the
velocity noise − x0 and is called with timestep = timestep_r = t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from sidestep.data.dataset import Batch
from sidestep.errors import ConfigError
from sidestep.models.variants import TURBO_SHIFT3_TIMESTEPS, Variant

__all__ = [
    "TimestepKind",
    "TimestepSampler",
    "Focus",
    "parse_focus",
    "sampler_for_focus",
    "sampler_for_training",
    "noise_like",
    "apply_cfg_dropout",
    "flow_matching_loss",
    "FOCUS_RANGES",
]


class TimestepKind(str, Enum):
    LOGIT_NORMAL = "logit_normal"  # t = sigmoid(N(mu, sigma)), the models' own training distribution
    UNIFORM = "uniform"  # t ~ U[low, high]
    DISCRETE = "discrete"  # t uniformly from a fixed table (turbo shift-3 schedule)


class Focus(str, Enum):
    BALANCED = "balanced"  # the model's own logit-normal t distribution
    TEXTURE = "texture"  # t in [0, 0.4]: little noise, timbre and sound design
    STRUCTURE = "structure"  # t in [0.6, 1]: much noise, rhythm and composition


FOCUS_RANGES: dict[Focus, tuple[float, float]] = {
    Focus.BALANCED: (0.0, 1.0),
    Focus.TEXTURE: (0.0, 0.4),
    Focus.STRUCTURE: (0.6, 1.0),
}


@dataclass(frozen=True, slots=True)
class TimestepSampler:
    kind: TimestepKind
    mu: float = -0.4
    sigma: float = 1.0
    low: float = 0.0
    high: float = 1.0
    table: tuple[float, ...] = ()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` timesteps in [0, 1] (float32, CPU), drawn only from `generator`."""
        if self.kind is TimestepKind.LOGIT_NORMAL:
            return torch.sigmoid(self.mu + self.sigma * torch.randn(n, generator=generator))
        if self.kind is TimestepKind.UNIFORM:
            return self.low + (self.high - self.low) * torch.rand(n, generator=generator)
        idx = torch.randint(len(self.table), (n,), generator=generator)
        return torch.tensor(self.table, dtype=torch.float32)[idx]


def parse_focus(text: str) -> tuple[str, tuple[float, float]]:
    """`balanced|texture|structure` or a custom `LOW,HIGH` range inside [0, 1] -> (label, range)."""
    text = text.strip().lower()
    try:
        focus = Focus(text)
        return focus.value, FOCUS_RANGES[focus]
    except ValueError:
        pass
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"--timestep-focus {text!r}: use balanced, texture, structure or a range LOW,HIGH such as 0.2,0.7."
        ) from None
    if not 0.0 <= low < high <= 1.0:
        raise ConfigError(f"--timestep-focus {text!r}: need 0 <= LOW < HIGH <= 1.")
    return f"{low:g},{high:g}", (low, high)


def sampler_for_focus(label: str, variant: Variant) -> TimestepSampler:
    """Analysis timesteps: the variant's logit-normal for `balanced`, uniform over the range otherwise."""
    if label == Focus.BALANCED.value:
        return TimestepSampler(TimestepKind.LOGIT_NORMAL, mu=variant.timestep_mu, sigma=variant.timestep_sigma)
    _, (low, high) = parse_focus(label)
    return TimestepSampler(TimestepKind.UNIFORM, low=low, high=high)


def sampler_for_training(mode: str | None, variant: Variant) -> TimestepSampler:
    """Training timesteps: `continuous` (logit-normal, default for base/sft) or `discrete` (turbo default)."""
    mode = mode or ("discrete" if variant.is_turbo else "continuous")
    if mode == "continuous":
        return TimestepSampler(TimestepKind.LOGIT_NORMAL, mu=variant.timestep_mu, sigma=variant.timestep_sigma)
    if mode == "discrete":
        return TimestepSampler(TimestepKind.DISCRETE, table=TURBO_SHIFT3_TIMESTEPS)
    raise ConfigError(f"--timestep-mode {mode!r}: use continuous or discrete.")


def noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise drawn on the CPU generator (device-independent, so CPU and GPU runs agree)."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def apply_cfg_dropout(encoder_hidden_states: torch.Tensor, null_embedding: torch.Tensor | None,
                      probability: float, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """Replace each sample's whole condition by the learned null embedding with `probability`.

    Args:
        encoder_hidden_states (`Tensor` of shape `(batch, L, D)`): the stored condition.
        null_embedding (`Tensor` of shape `(1, 1, D)`): the checkpoint's `null_condition_emb`.
        generator: one generator for the batch, or one per sample (each draws that sample's coin).
    """
    if probability <= 0.0 or null_embedding is None:
        return encoder_hidden_states
    if isinstance(generator, torch.Generator):
        coins = torch.rand(encoder_hidden_states.shape[0], generator=generator)
    else:
        coins = torch.cat([torch.rand(1, generator=g) for g in generator])
    drop = coins < probability
    if not drop.any():
        return encoder_hidden_states
    drop = drop.to(encoder_hidden_states.device).view(-1, 1, 1)
    null = null_embedding.to(encoder_hidden_states.dtype).expand_as(encoder_hidden_states)
    return torch.where(drop, null, encoder_hidden_states)


def flow_matching_loss(model: torch.nn.Module, batch: Batch, t: torch.Tensor, noise: torch.Tensor,
                       encoder_hidden_states: torch.Tensor | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """MSE between the predicted and the true velocity, over valid frames, in fp32.

    Args:
        t (`Tensor` of shape `(batch,)`): timesteps in [0, 1]; t = 1 is pure noise.
        noise (`Tensor` like `batch.target_latents`): x1.
        encoder_hidden_states: the condition after CFG dropout (default: the batch's).
        reduction: "mean" over all valid elements, or "none" for a per-sample loss of shape `(batch,)`.
    """
    x0 = batch.target_latents
    t = t.to(x0.device, x0.dtype)
    tt = t.view(-1, 1, 1)
    x_t = tt * noise + (1 - tt) * x0
    # Needed so non-reentrant gradient checkpointing has a graph even when every input is frozen data.
    x_t.requires_grad_(True)
    cond = batch.encoder_hidden_states if encoder_hidden_states is None else encoder_hidden_states
    pred = model(hidden_states=x_t, timestep=t, timestep_r=t, encoder_hidden_states=cond,
                 context_latents=batch.context_latents).sample
    err = (pred.float() - (noise - x0).float()).pow(2)
    mask = batch.attention_mask.float().unsqueeze(-1)
    per_sample = (err * mask).sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * err.shape[-1]).clamp_min(1.0)
    if reduction == "none":
        return per_sample
    return (err * mask).sum() / (mask.sum() * err.shape[-1]).clamp_min(1.0)
