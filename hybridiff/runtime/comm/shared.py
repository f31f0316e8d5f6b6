"""Collectives among CPU workers of one machine through shared memory.

Measured on a 2-core machine (2 workers x 1 thread, digits-sd3, 300 steps): gloo's all-gather
of a 1 KiB prediction cost 0.8-1.2 ms per step on average, against 0.2-0.4 ms here, because
gloo hands every collective to helper threads that must be woken on busy or halted cores.
Here each member writes its rows into its own slot, publishes a step counter, and polls the
others' counters (yielding its core); no thread, lock or system call sits on the path.

Two slot buffers alternate with the step number: a member writes buffer ``n % 2`` only at
exchange ``n``, which starts after every member finished exchange ``n - 1`` and so has read
buffer ``n % 2`` at exchange ``n - 2``. Stores are published in order (x86-64's ordering, and
a data copy that ends before the counter is written), which is why this is used on x86-64 only.
A member that never arrives ends the wait after the run's timeout with an error naming it.
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time
import uuid
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from hybridiff.errors import HybridiffError
from hybridiff.runtime.comm.blocks import run_prefix, shared_folder

#: Bytes between members' step counters (one cache line each).
_LINE = 64


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def poll_until(ready: Callable[[], bool], timeout_s: float, late: Callable[[], str]) -> None:
    """Poll ``ready`` (yielding the core between polls) until it holds; after ``timeout_s``
    raise ``late()``'s line. The clock is read every few thousand polls only."""
    deadline, polls = None, 0
    while not ready():
        os.sched_yield()
        polls += 1
        if polls % 4096 == 0:
            now = time.monotonic()
            deadline = deadline or now + timeout_s
            if now > deadline:
                raise HybridiffError(late())


def _row_bytes(template: torch.Tensor) -> int:
    return template[:1].numel() * template.element_size()


class SharedExchange:
    """Gathers rows among the ranks of ``group`` (all on this machine) through shared memory."""

    def __init__(self, group: tuple[int, ...], rank: int, process_group: dist.ProcessGroup | None, timeout_s: float) -> None:
        self.group, self.me = group, group.index(rank)
        self._pg, self._timeout_s = process_group, timeout_s
        self._memory: mmap.mmap | None = None
        self._capacity = 0
        self._step = 0

    def publish(self, chunk: torch.Tensor | None, sizes: list[int], template: torch.Tensor) -> None:
        """Start an exchange: member ``i`` gives ``sizes[i]`` rows shaped like ``template``'s
        rows (``chunk``: this member's). Every member calls it with the same sizes."""
        self._ensure(max(sizes) * _row_bytes(template))
        self._step += 1
        if chunk is not None and len(chunk):
            data = chunk.contiguous().view(-1).view(torch.uint8)
            self._slots[self._step % 2][self.me][: data.numel()].copy_(data)
        self._counters[self.me] = self._step

    def wait(self) -> None:
        """Until every member has published this exchange."""
        self._wait_for(self._step)

    def read(self, sizes: list[int], template: torch.Tensor) -> list[torch.Tensor]:
        """The rows of every member that gave some, in member order (copies)."""
        nbytes, shape = _row_bytes(template), template.shape[1:]
        slots = self._slots[self._step % 2]
        return [slots[m][: n * nbytes].clone().view(template.dtype).view(n, *shape) for m, n in enumerate(sizes) if n]

    def _wait_for(self, step: int) -> None:
        def missing() -> str:
            late = [self.group[m] for m, n in enumerate(self._counters) if n < step]
            return (
                f"rank(s) {late} did not reach the step's exchange within {self._timeout_s:g} s: "
                "a worker died or hangs; its output says why (HYBRIDIFF_TIMEOUT_S sets the limit)"
            )

        poll_until(lambda: self._counters.min() >= step, self._timeout_s, missing)

    def _ensure(self, capacity: int) -> None:
        """(Re)create the shared block when a member's rows outgrow it; every member decides
        the same from the same sizes, so they all take part in the collective below."""
        if capacity <= self._capacity:
            return
        self.close()
        self._capacity = max(capacity, 2 * self._capacity)
        members = len(self.group)
        size = _LINE * members + 2 * members * self._capacity
        path = [_create(size) if self.me == 0 else None]
        dist.broadcast_object_list(path, src=self.group[0], group=self._pg)
        with open(path[0], "r+b") as f:
            self._memory = mmap.mmap(f.fileno(), size)
        dist.barrier(group=self._pg)
        if self.me == 0:
            os.unlink(path[0])  # every member has it mapped; nothing is left behind, even on a crash
        self._step = 0
        self._counters = np.ndarray((members,), dtype=np.int64, buffer=self._memory, strides=(_LINE,))
        self._slots = [
            [
                torch.frombuffer(
                    self._memory, dtype=torch.uint8, count=self._capacity, offset=_LINE * members + (b * members + m) * self._capacity
                )
                for m in range(members)
            ]
            for b in range(2)
        ]

    def close(self) -> None:
        """Unmap the block (views into it are dropped first)."""
        if self._memory is not None:
            self._counters, self._slots = None, []
            self._memory.close()
            self._memory = None


def _create(size: int) -> str:
    """A new zero-filled file of ``size`` bytes in memory to map; its path."""
    fd, path = tempfile.mkstemp(prefix=f"{run_prefix()}-", dir=shared_folder())
    os.ftruncate(fd, size)
    os.close(fd)
    return path


def shared_name() -> str:
    """A name prefix for this run's shared blocks, the same on every rank (rank 0 draws it)."""
    drawn = [f"{run_prefix()}-{uuid.uuid4().hex[:12]}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(drawn, src=0)
    return drawn[0]


def same_memory(name: str) -> set[int]:
    """The ranks whose shared memory this rank sees (itself included): each rank leaves a probe
    in its ``/dev/shm`` and looks for the others'. A host name would not do: containers on one
    host each have their own ``/dev/shm``, and machines may share a name."""
    world = dist.get_world_size()
    probe = lambda r: shared_folder() / f"{name}-probe-{r}"  # noqa: E731
    probe(dist.get_rank()).touch()
    try:
        dist.barrier()
        seen = {r for r in range(world) if probe(r).exists()}
        everyone: list[set[int] | None] = [None] * world
        dist.all_gather_object(everyone, seen)
        dist.barrier()
    finally:
        probe(dist.get_rank()).unlink(missing_ok=True)
    me = dist.get_rank()
    return {r for r in seen if me in everyone[r]}
