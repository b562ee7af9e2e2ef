"""Work split over the processes of a torchrun launch and gathered back; a plain function call when run alone.

Trainer (through accelerate) starts the process group under torchrun: gloo on a CPU,
NCCL on GPUs. Evaluation runs after training on the same group, each rank on its share,
and every rank gets the whole result back, so the code around it reads as on one process.
Results are small Python objects (losses, token ids): torch.distributed's *_object
collectives pickle them, over gloo or NCCL alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes that share a run: rank 0 of 1 when run alone."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The initialized process group (torchrun, accelerate launch), else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """Every world-th item from this rank's: on a longest-first list each rank gets as many long items."""
        return list(items[self.rank :: self.world])

    def map_shared(self, work: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
        """`work(items)`, in the items' order, on every rank; each rank computes `work` on its share only.

        A collective: every rank must call it with the same items. `work` must return one result
        per item it was given, and an item's result must not depend on which other items share its call.
        """
        share = self.share(items)
        mine = work(share)
        if len(mine) != len(share):
            raise ValueError(f"work returned {len(mine)} results for {len(share)} items")
        if self.world == 1:
            return mine
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        return interleave(parts)

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank; the others wait for it (so also for what rank 0 did before)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a DTensor: every rank must call this), any other tensor as it is."""
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def interleave(parts: list[list[R]]) -> list[R]:
    """The inverse of `share`: rank r's part holds items r, r + world, ...; a short or empty part is fine."""
    out: list[Any] = [None] * sum(len(part) for part in parts)
    for rank, part in enumerate(parts):
        out[rank :: len(parts)] = part
    return out


ALONE = Ranks()  # one process: the default wherever work may be split
