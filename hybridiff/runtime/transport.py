"""Moving tensors between ranks: torch.distributed, or in memory for the emulation.

The schedule code is written once against ``Transport`` and loops over the ranks a process
hosts: one rank per worker process with ``DistTransport``, every rank in one process with
``LocalTransport``. Point-to-point messages are first-in first-out per (src, dst) pair, which
is what makes one-step-stale cut tensors line up: a value posted at step i is taken at i+1.
Both count the bytes each rank sends to other ranks, with the same accounting, so the
emulation predicts the distributed run's traffic exactly. Broadcasts run within a group (one
replica of the mesh); a broadcast counts its bytes once per receiver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict, deque

import torch
import torch.distributed as dist


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


#: Traffic is counted per phase of the schedule, in this order.
PHASES = ("cond-partition", "pipeline")


Group = tuple[int, ...]


class Transport(ABC):
    def __init__(self, hosted: tuple[int, ...]) -> None:
        self.hosted = hosted
        #: The phase the next messages belong to (set by the schedule).
        self.phase = PHASES[0]
        self.sent = dict.fromkeys(PHASES, 0)

    def _count(self, nbytes: int) -> None:
        self.sent[self.phase] += nbytes

    def take_counts(self) -> dict[str, int]:
        """Bytes the hosted ranks sent since the last call, per phase; restarts the count."""
        counts, self.sent = self.sent, dict.fromkeys(PHASES, 0)
        return counts

    @abstractmethod
    def post(self, src: int, dst: int, tensors: list[torch.Tensor]) -> None:
        """Send ``tensors`` from hosted rank ``src`` to ``dst`` (received by a later ``take``)."""

    @abstractmethod
    def take(self, src: int, dst: int, templates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Receive the oldest message ``src`` posted to hosted rank ``dst``, shaped like ``templates``."""

    def expect(self, src: int, dst: int, templates: list[torch.Tensor]) -> None:
        """Announce a message that a later ``take`` will receive, so it can arrive early."""

    @abstractmethod
    def broadcast(self, value: torch.Tensor | None, src: int, template: torch.Tensor, group: Group) -> torch.Tensor:
        """``src``'s tensor on every hosted rank of ``group`` (``value`` is given where ``src``
        is hosted; ``template`` gives the shape elsewhere)."""

    @abstractmethod
    def barrier(self, group: Group) -> None: ...


class LocalTransport(Transport):
    """All ranks in one process: messages are handed over in memory."""

    def __init__(self, hosted: tuple[int, ...]) -> None:
        super().__init__(hosted)
        self._mailbox: dict[tuple[int, int], deque[list[torch.Tensor]]] = defaultdict(deque)

    def post(self, src: int, dst: int, tensors: list[torch.Tensor]) -> None:
        if src != dst:
            self._count(_nbytes(tensors))
        self._mailbox[(src, dst)].append(tensors)

    def take(self, src: int, dst: int, templates: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._mailbox[(src, dst)].popleft()

    def broadcast(self, value: torch.Tensor | None, src: int, template: torch.Tensor, group: Group) -> torch.Tensor:
        assert value is not None
        self._count(_nbytes([value]) * (len(group) - 1))
        return value

    def barrier(self, group: Group) -> None:
        """All ranks are in this process: there is nobody to wait for."""


class DistTransport(Transport):
    """One rank per process over an initialised ``torch.distributed`` process group."""

    def __init__(self, groups: list[Group]) -> None:
        """``groups``: every broadcast group of the mesh, the same list on every rank (creating
        a process group is a collective over the whole world)."""
        super().__init__((dist.get_rank(),))
        self.rank = dist.get_rank()
        world = tuple(range(dist.get_world_size()))
        self._groups = {g: None if g == world else dist.new_group(list(g)) for g in groups if len(g) > 1}
        self._pending: list[tuple[dist.Work, list[torch.Tensor]]] = []
        self._expected: dict[tuple[int, int], deque[tuple[list[dist.Work], list[torch.Tensor]]]] = defaultdict(deque)
        #: Messages a rank sends itself (a group leader standing in for its own stage).
        self._to_self: deque[list[torch.Tensor]] = deque()

    def post(self, src: int, dst: int, tensors: list[torch.Tensor]) -> None:
        if dst == self.rank:
            self._to_self.append(tensors)
            return
        self._drain()
        tensors = [t.contiguous() for t in tensors]
        for t in tensors:
            self._pending.append((dist.isend(t, dst), tensors))
        self._count(_nbytes(tensors))

    def expect(self, src: int, dst: int, templates: list[torch.Tensor]) -> None:
        # gloo moves a message only once its receive is posted: posting it now lets the
        # transfer overlap the receiver's compute instead of starting the next step.
        if src == self.rank:
            return
        out = [torch.empty_like(t) for t in templates]
        self._expected[(src, dst)].append(([dist.irecv(t, src) for t in out], out))

    def take(self, src: int, dst: int, templates: list[torch.Tensor]) -> list[torch.Tensor]:
        if src == self.rank:
            return self._to_self.popleft()
        if self._expected[(src, dst)]:
            works, out = self._expected[(src, dst)].popleft()
            for work in works:
                work.wait()
            return out
        out = [torch.empty_like(t) for t in templates]
        for t in out:
            dist.recv(t, src)
        return out

    def broadcast(self, value: torch.Tensor | None, src: int, template: torch.Tensor, group: Group) -> torch.Tensor:
        if len(group) == 1:
            assert value is not None
            return value
        tensor = value.contiguous() if self.rank == src else torch.empty_like(template)
        dist.broadcast(tensor, src, group=self._groups[group])
        if self.rank == src:
            self._count(_nbytes([tensor]) * (len(group) - 1))
        return tensor

    def barrier(self, group: Group) -> None:
        if len(group) > 1:
            dist.barrier(group=self._groups[group])

    def take_counts(self) -> dict[str, int]:
        self._drain()
        return super().take_counts()

    def _drain(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
