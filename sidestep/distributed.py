"""Data parallelism over `torch.distributed`, as launched by `torchrun` or `accelerate launch`.

One process is the default and needs no launcher: then there is no process group and every helper here is
a no-op. With several processes the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`session()` joins the group (NCCL for CUDA tensors, gloo for CPU tensors and pickled objects) with a bounded
timeout (SIDESTEP_DIST_TIMEOUT seconds, default 600), so a dead peer or a stalled collective ends in one
`DistributedError` sentence instead of a hang. torch is imported lazily so `sidestep --help` stays fast.

Our own and not accelerate's `PartialState`: only a few collectives are needed, each must end in one sentence
within a bounded timeout, and precision and devices are already sidestep's; `accelerate launch` still works
as a launcher (it sets the same environment), so accelerate is not a dependency.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

from sidestep.errors import ConfigError, SidestepError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "DistContext", "DistributedError", "PeerFailed", "all_gather_objects",
           "all_gather_tensor", "all_reduce_sum", "average_gradients", "barrier", "broadcast_object",
           "broadcast_tensors", "context_from_env", "current", "gather_objects", "init_distributed", "owns",
           "run_on_main", "session", "shard", "shutdown", "sum_gradients"]

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "SIDESTEP_DIST_TIMEOUT"
T = TypeVar("T")


class DistributedError(SidestepError):
    """Another process died, or a collective did not finish within the timeout."""


class PeerFailed(SidestepError):
    """Process 0 failed in a step only it runs; it reports the error, the others exit quietly."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: process `rank` of `world_size`, on GPU `local_rank` of its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str | None = None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        """Process 0 writes files and talks to the user; the others stay silent unless they fail."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: "torch.device") -> "torch.device":
        """A CUDA device becomes this process's GPU (`cuda:LOCAL_RANK`); others are unchanged."""
        import torch

        if self.is_distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device



_CURRENT = DistContext()


def current() -> DistContext:
    """The context of the running session (one process when no launcher started us)."""
    return _CURRENT


def context_from_env(environ: dict[str, str] | None = None) -> DistContext:
    """Read the launcher's RANK / WORLD_SIZE / LOCAL_RANK and SIDESTEP_DIST_TIMEOUT; one process when unset."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1, 1)
    rank = _env_int(env, "RANK", 0, 0)
    local = _env_int(env, "LOCAL_RANK", rank, 0)
    if rank >= world:
        raise ConfigError(f"env RANK={rank} is not below WORLD_SIZE={world}; launch with torchrun or "
                          "accelerate launch.")
    raw = env.get(TIMEOUT_ENV, "").strip()
    timeout = DEFAULT_TIMEOUT_S
    if raw:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < 1e7:
            raise ConfigError(f"env {TIMEOUT_ENV}={raw!r} is not valid: expected seconds > 0; fix or unset it.")
    return DistContext(rank, world, local, timeout)


def init_distributed(timeout_s: float | None = None) -> DistContext:
    """Join the process group the launcher set up (no-op for one process) and make it `current()`."""
    global _CURRENT
    ctx = context_from_env()
    if timeout_s is not None:
        ctx = replace(ctx, timeout_s=float(timeout_s))
    if not ctx.is_distributed:
        _CURRENT = ctx
        return ctx
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"env LOCAL_RANK={ctx.local_rank} but this machine has {torch.cuda.device_count()} "
                              f"GPU(s); start at most that many processes per machine (--nproc_per_node).")
        torch.cuda.set_device(ctx.local_rank)
        # Blocking wait makes a timed-out NCCL collective raise (and end in our sentence) instead of aborting.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        backend = "cpu:gloo,cuda:nccl"
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ConfigError(f"WORLD_SIZE={ctx.world_size} is set but {var} is not; launch with "
                              f"`torchrun --nproc_per_node N -m sidestep ...` or `accelerate launch`.")
    ctx = replace(ctx, backend=backend)
    try:
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=timedelta(seconds=ctx.timeout_s))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"Process {ctx.rank + 1} of {ctx.world_size} could not reach the others at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {ctx.timeout_s:g} s; "
                               f"nothing was written.") from err
    _CURRENT = ctx
    return ctx


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group (safe to call twice, and after a failed collective).

    With `wait_for_peers`, the processes first meet at a barrier: gloo can abort a process ("terminate called
    without an active exception") when its peer tears the group down while it is still closing its own pairs.
    """
    global _CURRENT
    if _CURRENT.is_distributed:
        import torch.distributed as dist

        with contextlib.suppress(Exception):  # a group broken by a dead peer may refuse a clean destroy
            if dist.is_initialized():
                if wait_for_peers:
                    _teardown_barrier(dist)
                dist.destroy_process_group()
    _CURRENT = DistContext()


def _teardown_barrier(dist) -> None:
    import datetime

    if dist.get_backend() == "gloo":  # bounded: a peer that failed after its last collective must not stall us
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=min(30.0, _CURRENT.timeout_s)))
    else:
        dist.barrier()


@contextlib.contextmanager
def session(timeout_s: float | None = None) -> Iterator[DistContext]:
    """`init_distributed()` ... `shutdown()`; for one process it only yields the single-process context."""
    ctx = init_distributed(timeout_s)
    clean = False
    try:
        yield ctx
        clean = True
    except SystemExit as done:  # Typer ends every command with SystemExit; code 0 is a clean finish
        clean = done.code in (0, None)
        raise
    finally:
        shutdown(wait_for_peers=clean)


# ---- collectives (each a no-op for one process) -----------------------------------------------------------


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:  # DistBackendError / DistNetworkError / gloo's "Connection closed by peer"
        ctx = _CURRENT
        raise DistributedError(f"Process {ctx.rank + 1} of {ctx.world_size}: another process stopped or a collective "
                               f"timed out after {ctx.timeout_s:g} s; nothing half-written was left.") from err


def all_reduce_sum(tensor: "torch.Tensor") -> "torch.Tensor":
    """Sum `tensor` over the processes, in place; returns it."""
    if _CURRENT.is_distributed:
        import torch.distributed as dist

        with _collective():
            dist.all_reduce(tensor)
    return tensor


def all_gather_tensor(tensor: "torch.Tensor") -> "torch.Tensor":
    """Every process's `tensor` stacked in rank order: shape `(world_size, *tensor.shape)`."""
    import torch

    if not _CURRENT.is_distributed:
        return tensor.unsqueeze(0)
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(_CURRENT.world_size)]
    with _collective():
        dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def broadcast_object(obj: T) -> T:
    """Process 0's `obj` (picklable) on every process."""
    if not _CURRENT.is_distributed:
        return obj
    import torch
    import torch.distributed as dist

    box = [obj if _CURRENT.is_main else None]
    with _collective():
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def broadcast_tensors(tensors: Sequence["torch.Tensor"]) -> None:
    """Overwrite `tensors` with process 0's values (one flat broadcast)."""
    if not _CURRENT.is_distributed or not tensors:
        return
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    with _collective():
        dist.broadcast(flat, src=0)
    _unflatten(flat, tensors)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not _CURRENT.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _CURRENT.world_size
    with _collective():
        dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any) -> list[Any] | None:
    """Every process's `obj`, in rank order, on process 0; None on the others."""
    gathered = all_gather_objects(obj)  # objects are small here; gloo's gather_object needs the same round trips
    return gathered if _CURRENT.is_main else None


def barrier() -> None:
    """Wait until every process got here (bounded by the timeout)."""
    if _CURRENT.is_distributed:
        import torch

        all_reduce_sum(torch.zeros(1))


def shard(items: Sequence[T]) -> list[T]:
    """This process's disjoint strided share of `items`: items[rank::world_size]."""
    return list(items[_CURRENT.rank :: _CURRENT.world_size])


def owns(index: int) -> bool:
    """Whether work item `index` is this process's under `shard`'s rule (for loops that must still see every item)."""
    return index % _CURRENT.world_size == _CURRENT.rank


def run_on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on process 0 only and hand its result to all; its SidestepError stops every process.

    Process 0 raises the error itself; the others raise `PeerFailed` with the same sentence, which the CLI
    does not print again.
    """
    if not _CURRENT.is_distributed:
        return fn()
    if _CURRENT.is_main:
        try:
            result = fn()
        except SidestepError as err:
            broadcast_object(("error", str(err)))
            raise
        except BaseException:
            broadcast_object(("error", "Process 1 failed with an unexpected error; see its traceback."))
            raise
        return broadcast_object(("ok", result))[1]
    status, payload = broadcast_object(None)
    if status == "error":
        raise PeerFailed(payload)
    return payload


def average_gradients(params: Sequence["torch.Tensor"], *scalars: float) -> tuple[float, ...]:
    """Average the gradients of `params` and the `scalars` over the processes in one all-reduce.

    Equals DDP's gradient averaging; a missing gradient counts as zeros. Returns the averaged scalars.
    """
    return _reduce_gradients(params, scalars, average=True)


def sum_gradients(params: Sequence["torch.Tensor"]) -> None:
    """Sum the gradients of `params` over the processes in one all-reduce (each process computed a disjoint share
    of one batch's terms); a missing gradient counts as zeros."""
    _reduce_gradients(params, (), average=False)


def _reduce_gradients(params: Sequence["torch.Tensor"], scalars: Sequence[float], average: bool) -> tuple[float, ...]:
    if not _CURRENT.is_distributed:
        return tuple(scalars)
    import torch

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    device = grads[0].device if grads else torch.device("cpu")
    extra = torch.tensor(scalars, dtype=torch.float32, device=device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra])
    all_reduce_sum(flat)
    if average:
        flat.div_(_CURRENT.world_size)
    _unflatten(flat, grads)
    return tuple(float(x) for x in flat[flat.numel() - len(scalars):].tolist())


def _unflatten(flat: "torch.Tensor", tensors: Sequence["torch.Tensor"]) -> None:
    import torch

    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def _env_int(env: Any, name: str, default: int, lowest: int) -> int:
    raw = str(env.get(name, "")).strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lowest - 1
    if value < lowest:
        raise ConfigError(f"env {name}={raw!r} is not valid: expected an integer >= {lowest}; launch with torchrun "
                          f"or accelerate launch, or unset it.")
    return value
