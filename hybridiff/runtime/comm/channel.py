"""Cut tensors from one rank to another on this machine, through shared memory.

gloo's point-to-point receives cannot be polled: a worker waiting for a cut tensor sleeps, and
on a 2-core virtual machine it often wakes a scheduler tick (about 4 ms) late, which on
digits-sdxl made a window step average 10.6 ms against 7.5 ms predicted. Here the sender
copies a message into a ring of slots in a shared block and publishes a counter; the receiver
polls the counter (yielding its core), copies the message out and publishes its own counter,
which frees the slot. No thread, lock or system call sits on the path (the ordering argument
is ``runtime.comm.shared``'s, so this too is for x86-64 only).

Messages stay first-in first-out, like point-to-point sends. Both ends know every message's
size (the receiver from the plan's shapes), so both decide alike when a message outgrows the
block: the sender then creates a larger one under the next generation's name and the
receiver, once it has read what was left in the old one, opens it. The receiver removes each
block's name from ``/dev/shm`` as soon as it has mapped it; after a failure the sender removes
the ones never opened.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import torch

from hybridiff.runtime.comm.blocks import shared_folder
from hybridiff.runtime.comm.shared import poll_until

#: Messages a sender may be ahead of its receiver; one that finds the ring full waits for a read.
DEPTH = 4
#: Alignment of each tensor in a slot (a cache line), so every dtype's view is aligned.
_ALIGN = 64
_MIN_CAPACITY = 1 << 16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def message_bytes(tensors: list[torch.Tensor]) -> int:
    """The slot bytes a message takes: its tensors one after another, each aligned."""
    return sum(_aligned(t.numel() * t.element_size()) for t in tensors)


class _Block:
    """One mapped block: the sender's and the receiver's counters, then ``DEPTH`` slots."""

    def __init__(self, path: Path, capacity: int, create: bool) -> None:
        size = 2 * _ALIGN + DEPTH * capacity
        if create:
            partial = path.with_name(path.name + ".partial")
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
            os.rename(partial, path)  # the receiver never sees a block of the wrong size
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self.memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.capacity = capacity
        #: [messages written, messages read] in this block.
        self.counters = np.ndarray((2,), dtype=np.int64, buffer=self.memory, strides=(_ALIGN,))
        self.slots = [
            torch.frombuffer(self.memory, dtype=torch.uint8, count=capacity, offset=2 * _ALIGN + i * capacity) for i in range(DEPTH)
        ]

    def close(self) -> None:
        self.counters, self.slots = None, []
        self.memory.close()


class SharedChannel:
    """One end of the one-way channel from rank ``src`` to rank ``dst`` (``sending`` says which).

    ``name``: a prefix both ends agreed on, unique to the run (``shared.shared_name``)."""

    def __init__(self, name: str, src: int, dst: int, sending: bool, timeout_s: float) -> None:
        self.src, self.dst, self.sending = src, dst, sending
        self._prefix = f"{name}-{src}to{dst}"
        self._timeout_s = timeout_s
        self._block: _Block | None = None
        self._generation = 0
        self._count = 0  # messages sent or received in the current block
        self._created: list[Path] = []  # blocks this sender made (the receiver unlinks each it opens)

    def _path(self, generation: int) -> Path:
        return shared_folder() / f"{self._prefix}-{generation}"

    def _fit(self, nbytes: int) -> None:
        """Move to the next block if this message does not fit the current one (both ends
        decide alike from the same sizes)."""
        if self._block is not None and nbytes <= self._block.capacity:
            return
        capacity = max(_MIN_CAPACITY, nbytes, 2 * (self._block.capacity if self._block else 0))
        if self._block is not None:
            self._block.close()
        self._generation += 1
        self._count = 0
        path = self._path(self._generation)
        if self.sending:
            self._block = _Block(path, capacity, create=True)
            self._created.append(path)
            return
        poll_until(path.exists, self._timeout_s, lambda: self._late("create its buffer"))
        self._block = _Block(path, capacity, create=False)
        path.unlink()

    def send(self, tensors: list[torch.Tensor]) -> None:
        """Copy ``tensors`` into the next slot (waiting while the receiver is ``DEPTH`` behind)."""
        self._fit(message_bytes(tensors))
        block, number = self._block, self._count + 1
        poll_until(lambda: block.counters[1] >= number - DEPTH, self._timeout_s, lambda: self._late("read earlier cut tensors", self.dst))
        slot, offset = block.slots[(number - 1) % DEPTH], 0
        for t in tensors:
            data = t.detach().contiguous().view(-1).view(torch.uint8)
            slot[offset : offset + data.numel()].copy_(data)
            offset += _aligned(data.numel())
        self._count = number
        block.counters[0] = number

    def arrive(self, templates: list[torch.Tensor]) -> None:
        """Wait until the next message, shaped like ``templates``, is there."""
        self._fit(message_bytes(templates))
        block, number = self._block, self._count + 1
        poll_until(lambda: block.counters[0] >= number, self._timeout_s, lambda: self._late("send its cut tensors", self.src))

    def read(self, templates: list[torch.Tensor]) -> list[torch.Tensor]:
        """The message ``arrive`` waited for, as new tensors; frees its slot."""
        block, number = self._block, self._count + 1
        slot, offset, out = block.slots[(number - 1) % DEPTH], 0, []
        for t in templates:
            received = torch.empty_like(t, device="cpu")
            data = received.view(-1).view(torch.uint8)
            data.copy_(slot[offset : offset + data.numel()])
            offset += _aligned(data.numel())
            out.append(received)
        self._count = number
        block.counters[1] = number
        return out

    def _late(self, what: str, peer: int) -> str:
        return (
            f"rank {peer} did not {what} within {self._timeout_s:g} s: a worker died or hangs; its output says why "
            "(HYBRIDIFF_TIMEOUT_S sets the limit)"
        )

    def close(self, graceful: bool = True) -> None:
        """Unmap. After a failure the receiver may never open the blocks this sender created,
        so their names are removed; in a run that ended well it has opened them all, or will."""
        if self._block is not None:
            self._block.close()
            self._block = None
        if not graceful:
            for path in self._created:
                path.unlink(missing_ok=True)
        self._created.clear()
