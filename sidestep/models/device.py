"""Device, precision and memory features: chosen automatically, overridable, each with its reason."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sidestep.errors import ConfigError

__all__ = ["Runtime", "on_this_process", "resolve_runtime", "PRECISIONS"]

PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, slots=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    gradient_checkpointing: bool
    reason: str  # one line: where each choice came from, printed at start

    @property
    def precision(self) -> str:
        return next(k for k, v in PRECISIONS.items() if v == self.dtype)


def resolve_runtime(device: str | None = None, precision: str | None = None,
                    gradient_checkpointing: bool | None = None) -> Runtime:
    """Flag > auto for each of device, dtype and gradient checkpointing."""
    dev, dev_why = _resolve_device(device)
    dtype, dtype_why = _resolve_dtype(precision, dev)
    if gradient_checkpointing is None:
        # Checkpointing trades ~30% compute for activation memory: worth it on accelerators, not on CPU.
        gradient_checkpointing, gc_why = dev.type != "cpu", "auto"
    else:
        gc_why = "flag"
    reason = f"device {dev} ({dev_why}), {_name(dtype)} ({dtype_why}), gradient checkpointing {'on' if gradient_checkpointing else 'off'} ({gc_why})"
    return Runtime(dev, dtype, gradient_checkpointing, reason)


def _resolve_device(flag: str | None) -> tuple[torch.device, str]:
    if flag and flag != "auto":
        try:
            dev = torch.device(flag)
        except RuntimeError as err:
            raise ConfigError(f"--device {flag!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {flag} was asked for but CUDA is not available on this machine.")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--device mps was asked for but MPS is not available on this machine.")
        return dev, "--device"
    if torch.cuda.is_available():
        return torch.device("cuda"), "auto: CUDA found"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "auto: Apple MPS found"
    return torch.device("cpu"), "auto: no accelerator"


def _resolve_dtype(flag: str | None, dev: torch.device) -> tuple[torch.dtype, str]:
    if flag and flag != "auto":
        if flag not in PRECISIONS:
            raise ConfigError(f"--precision {flag!r} is not supported; use auto, bf16, fp16 or fp32.")
        return PRECISIONS[flag], "--precision"
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA with bf16"
        return torch.float16, "auto: CUDA without bf16"
    if dev.type == "mps":
        return torch.float16, "auto: MPS"
    return torch.float32, "auto: CPU"


def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in PRECISIONS.items() if v == dtype)


def on_this_process(runtime: Runtime) -> Runtime:
    """`runtime` on this process's device under torchrun (`cuda:LOCAL_RANK`), its reason saying so."""
    from sidestep.distributed import current

    ctx = current()
    device = ctx.device(runtime.device)
    if device == runtime.device:
        return runtime
    reason = f"{runtime.reason}; process {ctx.rank + 1} of {ctx.world_size} on {device}"
    return replace(runtime, device=device, reason=reason)
