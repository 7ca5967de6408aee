"""Process-group setup and gather helpers (torchrun environment; identity in a single process)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, else gloo); a plain process runs alone."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (e.g. a padded length)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ----------------------------------------------------------------------------- stop during evaluation


class StopRequested(Exception):
    """A stop signal (SIGTERM/SIGUSR1) arrived during an evaluation: every rank abandons it at the
    same batch boundary (`stoppable`), the trainer saves and exits 75."""


_stop_requested: Callable[[], bool] | None = None  # set by the trainer while it runs


def watch_stop(requested: Callable[[], bool] | None) -> None:
    """Make `stoppable` loops check `requested()` between batches (None: never check)."""
    global _stop_requested
    _stop_requested = requested


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def stoppable(items: Iterable, count: int) -> Iterator:
    """`items` (`count` of them on this rank), raising StopRequested before an item when a stop was
    requested on any rank. With several ranks the check is collective (one all_reduce per item),
    over the first min-over-ranks `count` items only, so ranks with more items never wait for one
    that has finished: they agree on the same boundary. Outside a trainer, `items` unchanged."""
    if _stop_requested is None:
        yield from items
        return
    agreed = count
    if is_distributed():
        t = torch.tensor([count], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        agreed = int(t.item())
    iterator = iter(items)
    for i in range(count + 1):
        if i < agreed:
            flag = bool(_stop_requested())
            if is_distributed():
                t = torch.tensor([int(flag)], device=_collective_device())
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                flag = bool(t.item())
            if flag:
                raise StopRequested
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item
    yield from iterator  # more items than announced: no more checks


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (the one object all-gather; a collective: cheap
    objects, rare calls). A single process gets `[obj]`."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def gather_rows(t: Tensor, counts: list[int] | None = None) -> tuple[Tensor, list[int]]:
    """Concatenate `t` from all ranks along dim 0 in rank order, and return each rank's row count.

    Ranks may hold different numbers of rows (a batch that lost unreadable samples); the other
    dimensions must agree. Without `counts`, one small all_gather of the shapes (a host sync)
    precedes the data gather; pass the counts of an earlier gather of the same batch to skip it.
    """
    if not is_distributed():
        return t, [t.shape[0]]
    t = t.contiguous()
    if counts is None:
        shape = torch.tensor(t.shape, device=t.device)
        shapes = [torch.empty_like(shape) for _ in range(get_world_size())]
        dist.all_gather(shapes, shape)
        shapes = [s.tolist() for s in shapes]
        if any(s[1:] != list(t.shape[1:]) for s in shapes):
            raise RuntimeError(
                f"all_gather needs the same shape past dim 0 on every rank, got {shapes}; pad variable dimensions"
            )
        counts = [s[0] for s in shapes]
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, max(counts) - t.shape[0]))
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0), counts


def all_gather_concat(t: Tensor) -> Tensor:
    """Concatenate `t` from all ranks along dim 0, in rank order (no gradient): `gather_rows`
    without the counts."""
    return gather_rows(t)[0]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Like `all_gather_concat`, but the local slice is `t` itself, so gradients reach it (only it)."""
    if not is_distributed():
        return t
    gathered, counts = gather_rows(t.detach())
    start = sum(counts[: get_rank()])
    return torch.cat([gathered[:start], t, gathered[start + t.shape[0]:]], dim=0)
