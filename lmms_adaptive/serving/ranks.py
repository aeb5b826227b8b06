"""Several processes under `accelerate launch` (or torchrun): this process's rank and device, and the few
collectives the commands need (barrier, shard, gather of small objects, sum of gradients).

Without a launcher (`WORLD_SIZE` unset or 1) every function is the single-process identity and no process
group exists. On CPUs the launcher must say so (`ACCELERATE_USE_CPU=true`): the ranks then talk over gloo.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process among `world` ones: its `rank` (0 is the main one) and the `device` it runs on (None:
    the caller's default, single process only)."""

    rank: int = 0
    world: int = 1
    device: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every `world`-th one from position `rank` (all ranks together
        hold each item exactly once, for any world size)."""
        return list(items[self.rank :: self.world])

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable, small), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place (through this rank's device: nccl reduces no CPU tensor)."""
        if self.world > 1:
            reduced = tensor.to(self.device)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            if reduced is not tensor:
                tensor.copy_(reduced)
        return tensor

    def sum_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Each parameter's `.grad` becomes its sum over the ranks (of losses each rank scaled by its share of
        the batch, that is the whole batch's gradient). A parameter no rank has a gradient for keeps None, as
        a single process would leave it (Adam then skips it)."""
        if self.world == 1:
            return
        has = self.sum(torch.tensor([float(p.grad is not None) for p in params]))
        for p, n in zip(params, has.tolist()):
            if n:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.sum(p.grad)


SINGLE = Ranks()  # one process, no launcher: the default of every function that takes ranks


def world_size_env() -> int:
    """The number of processes the launcher started (`WORLD_SIZE`; 1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init(device: str | None = None) -> Ranks:
    """Join the launcher's process group (accelerate picks gloo on CPUs, nccl on GPUs) and this rank's device
    (which replaces `device`); a single process gets `Ranks(device=device)` and no process group."""
    if world_size_env() <= 1:
        return Ranks(device=device)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes != world_size_env():
        raise RuntimeError(
            f"launched as {world_size_env()} processes (WORLD_SIZE) but accelerate set up {state.num_processes}: "
            "on CPUs launch with ACCELERATE_USE_CPU=true (accelerate launch --multi_gpu --num_processes N)"
        )
    return Ranks(state.process_index, state.num_processes, str(state.device))
