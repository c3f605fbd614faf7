"""Data-parallel training under ``torchrun`` (DDP), and the no-op single-process case.

``torchrun --nproc_per_node=N train.py --config ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each. When
``WORLD_SIZE`` > 1, :func:`setup` joins the process group: NCCL when training on CUDA (each
process on ``cuda:LOCAL_RANK``), gloo on CPU. Without those variables every helper here is a
no-op and training runs exactly as a single process.

Division of labour in a distributed run (see ``pipeline/training/run.py``):

* rank 0 prepares the run folder, the data (synthetic generation, splits, tile labels) and
  broadcasts the tile index; an error there is raised on every rank with the same message;
* every rank trains on its own disjoint shard of the epoch's balanced tile sample
  (:func:`shard`), gradients are averaged by DDP;
* rank 0 alone validates, writes checkpoints, logs and metrics, and broadcasts the
  early-stopping state; every rank resumes from the same ``last.pt``;
* after the patch stage the other ranks leave; rank 0 trains the (small) aggregator and writes
  the bundle.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np

from pipeline.core.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a rank waits in a collective (e.g. while rank 0 validates) before giving up.
DEFAULT_TIMEOUT_S = 3600
TIMEOUT_ENV = "NME_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, backend and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: Any = None  # torch.device of this rank (None when not distributed)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


_CTX = DistContext()


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables; None for a plain single process."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return None
    try:
        w, r, lr = int(world), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError(
            f"invalid torchrun variables WORLD_SIZE={world!r} RANK={os.environ.get('RANK')!r} "
            f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}"
        ) from None
    if w <= 1:
        return None
    if not 0 <= r < w:
        raise ConfigError(f"RANK {r} outside WORLD_SIZE {w}")
    return r, w, lr


def rank_device(spec: str, local_rank: int):
    """The device of a rank: ``cuda:LOCAL_RANK`` when training on CUDA, else the CPU."""
    import torch

    from pipeline.core.runtime import resolve_device

    dev = resolve_device(spec)
    if dev.type != "cuda":
        return dev
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} but only {n} CUDA device(s) on this node; "
            "use --nproc_per_node at most the number of GPUs"
        )
    if dev.index is not None and dev.index != local_rank:
        log.warning("device %s ignored under torchrun: rank uses cuda:%d (LOCAL_RANK)", spec, local_rank)
    return torch.device("cuda", local_rank)


class _RankTag(logging.Filter):
    """Prefix log messages with ``[rank R/W]`` (once per record, whatever the number of handlers)."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.tag = f"[rank {rank}/{world}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_rank_tagged", False):
            record.msg = f"{self.tag}{record.msg}"
            record._rank_tagged = True
        return True


def setup(device_spec: str = "auto") -> DistContext:
    """Join the torchrun process group if there is one; returns this process's :class:`DistContext`.

    Every rank logs one line (rank, world size, backend, device, host); afterwards ranks other
    than 0 log warnings and errors only.
    """
    global _CTX
    import torch
    import torch.distributed as dist

    ranks = env_ranks()
    if ranks is None:
        _CTX = DistContext()
        return _CTX
    if dist.is_initialized():
        return _CTX
    rank, world, local_rank = ranks
    device = rank_device(device_spec, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, timeout=timeout)
    _CTX = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)
    root = logging.getLogger()
    for h in root.handlers:
        h.addFilter(_RankTag(rank, world))
    log.info(
        "joined: rank %d of %d (local rank %d) on %s, backend %s, host %s, pid %d",
        rank,
        world,
        local_rank,
        device,
        backend,
        socket.gethostname(),
        os.getpid(),
    )
    if rank != 0:
        root.setLevel(max(root.level, logging.WARNING))
    return _CTX


def current() -> DistContext:
    """The context set by :func:`setup` (single process if it was not called)."""
    return _CTX


def shutdown() -> None:
    """Leave the process group (no-op when not distributed)."""
    global _CTX
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = DistContext()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _CTX.enabled:
        import torch.distributed as dist

        if _CTX.backend == "nccl":
            dist.barrier(device_ids=[_CTX.device.index])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled); the other ranks' ``obj`` is a placeholder (e.g. None)."""
    if not _CTX.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_CTX.device if _CTX.backend == "nccl" else None)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not _CTX.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _CTX.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if not _CTX.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_CTX.device if _CTX.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result.

    A :class:`PipelineError` on rank 0 is raised on every rank with the same one-line message;
    any other exception is re-raised on rank 0 with its traceback, the other ranks raise a
    RuntimeError naming it. Single process: just ``fn(*args, **kwargs)``.
    """
    if not _CTX.enabled:
        return fn(*args, **kwargs)
    payload: tuple[str, Any, Any] | None = None
    error: BaseException | None = None
    if _CTX.is_main:
        try:
            payload = ("ok", fn(*args, **kwargs), None)
        except PipelineError as exc:
            error, payload = exc, ("error", type(exc), str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
            error, payload = exc, ("crash", None, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    payload = broadcast_object(payload)
    assert payload is not None
    kind, value, message = payload
    if kind == "ok":
        return value
    if error is not None:
        raise error
    if kind == "error" and isinstance(value, type) and issubclass(value, PipelineError):
        raise value(message)
    raise RuntimeError(f"rank 0 failed: {message}")


def shard(items: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s share of ``items`` (like ``DistributedSampler(shuffle=False)``).

    The list is padded by repeating its head to a multiple of ``world`` so every rank gets the
    same number of items (DDP needs the same number of steps everywhere); rank r takes items
    r, r + world, r + 2·world, ... Positions are disjoint across ranks and together cover the
    whole list. ``world == 1`` returns ``items`` unchanged.
    """
    if world <= 1:
        return items
    n = len(items)
    if n == 0:
        return items
    per_rank = -(-n // world)
    pad = per_rank * world - n
    padded = np.concatenate([items, items[np.arange(pad) % n]]) if pad else items
    return padded[rank::world]


def wrap_model(model):
    """``model`` wrapped in DistributedDataParallel (the model itself when not distributed)."""
    if not _CTX.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if _CTX.backend == "nccl":
        return DistributedDataParallel(model, device_ids=[_CTX.device.index], output_device=_CTX.device.index)
    return DistributedDataParallel(model)


def unwrap(model):
    """The bare module inside a DDP wrapper."""
    return getattr(model, "module", model)
