"""Moving tensors between ranks: torch.distributed, or in memory for the emulation.

The schedule code is written once against ``Transport`` and loops over the ranks a process
hosts: one rank per worker process with ``DistTransport``, every rank in one process with
``LocalTransport``. Point-to-point messages are first-in first-out per (src, dst) pair, which
is what makes one-step-stale cut tensors line up: a value posted at step i is taken at i+1.
Both count the bytes each rank sends to other ranks, with the same accounting, so the
emulation predicts the distributed run's traffic exactly. Collectives run within a group (one
replica of the mesh) and count each sender's bytes once per receiver.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from typing import Any

import torch
import torch.distributed as dist

from hybridiff.runtime.comm import shared as shm
from hybridiff.runtime.comm.channel import SharedChannel
from hybridiff.runtime.comm.shared import SharedExchange
from hybridiff.runtime.spans import Spans


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Done:
    """A gather that has already finished."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts

    def wait(self) -> list[torch.Tensor]:
        return self.parts


class _Pending:
    """A gather still on its way: ``wait()`` finishes it."""

    def __init__(self, work: dist.Work, parts: list[torch.Tensor]) -> None:
        self.work, self.parts = work, parts

    def wait(self) -> list[torch.Tensor]:
        self.work.wait()
        return self.parts


Group = tuple[int, ...]


class Transport(ABC):
    def __init__(self, hosted: tuple[int, ...], spans: Spans | None = None) -> None:
        self.hosted = hosted
        self.spans = spans or Spans()
        #: Bytes the hosted ranks have sent to other ranks so far. The executor reads it around
        #: each action, so traffic is counted under the action's phase (``program.actions``).
        self.sent_bytes = 0

    def _count(self, nbytes: int) -> None:
        self.sent_bytes += nbytes

    @abstractmethod
    def post(self, src: int, dst: int, tensors: list[torch.Tensor]) -> None:
        """Send ``tensors`` from hosted rank ``src`` to ``dst`` (received by a later ``take``)."""

    @abstractmethod
    def take(self, src: int, dst: int, templates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Receive the oldest message ``src`` posted to hosted rank ``dst``, shaped like ``templates``."""

    def expect(self, src: int, dst: int, templates: list[torch.Tensor]) -> None:
        """Announce a message that a later ``take`` will receive, so it can arrive early."""

    def flush(self) -> None:
        """Wait until the messages posted so far have left."""

    def close(self, graceful: bool = True) -> None:
        """Release what the transport holds besides the process group (``graceful``: every
        rank got to the end)."""

    def release_waiters(self) -> None:
        """After a hosted peer failed: wake the peers waiting for it in a shard exchange."""

    @abstractmethod
    def broadcast(self, value: torch.Tensor | None, src: int, template: torch.Tensor, group: Group) -> torch.Tensor:
        """``src``'s tensor on every hosted rank of ``group`` (``value`` is given where ``src``
        is hosted; ``template`` gives the shape elsewhere)."""

    @abstractmethod
    def gather_rows(self, chunks: dict[int, torch.Tensor], sizes: list[int], group: Group, template: torch.Tensor) -> torch.Tensor:
        """Every member's rows, concatenated in member order, on every hosted rank of ``group``.

        Member ``group[i]`` contributes ``sizes[i]`` rows (possibly none); ``chunks`` holds the
        hosted members' rows by rank; ``template`` is one row, for the shape."""

    @abstractmethod
    def barrier(self, group: Group) -> None: ...

    @abstractmethod
    def gather_shards(self, rank: int, tensor: torch.Tensor, peers: Group) -> list[torch.Tensor]:
        """Every shard peer's ``tensor`` (one shape on all), in peer order, for hosted ``rank``
        (``runtime.sequence``): all peers call it together."""

    def gather_shards_later(self, rank: int, tensor: torch.Tensor, peers: Group) -> Any:
        """``gather_shards`` whose result is needed only later: returns a handle whose
        ``wait()`` gives it (``runtime.patches`` reads it one full step later)."""
        return _Done(self.gather_shards(rank, tensor, peers))

    def _count_gather(self, chunks: dict[int, torch.Tensor], group: Group) -> None:
        for chunk in chunks.values():
            self._count(_nbytes([chunk]) * (len(group) - 1))


class _Meeting:
    """Where the threads of one group of shard peers swap tensors. A peer that fails breaks the
    meeting, so the others stop waiting and fail too."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties)
        self._slots: list[torch.Tensor | None] = [None] * parties

    def exchange(self, index: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._slots[index] = tensor
        self._barrier.wait()
        gathered = list(self._slots)
        self._barrier.wait()  # nobody writes the next exchange's slot before all have read
        return gathered

    def abort(self) -> None:
        self._barrier.abort()


class LocalTransport(Transport):
    """All ranks in one process: messages are handed over in memory."""

    def __init__(self, hosted: tuple[int, ...], spans: Spans | None = None) -> None:
        super().__init__(hosted, spans)
        self._mailbox: dict[tuple[int, int], deque[list[torch.Tensor]]] = defaultdict(deque)
        self._meetings: dict[Group, _Meeting] = {}
        self._lock = threading.Lock()

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

    def gather_rows(self, chunks: dict[int, torch.Tensor], sizes: list[int], group: Group, template: torch.Tensor) -> torch.Tensor:
        chunks = {r: c for r, c in chunks.items() if len(c)}
        self._count_gather(chunks, group)
        return torch.cat([chunks[r] for r, n in zip(group, sizes) if n])

    def barrier(self, group: Group) -> None:
        """All ranks are in this process: there is nobody to wait for."""

    def release_waiters(self) -> None:
        with self._lock:
            for meeting in self._meetings.values():
                meeting.abort()
            self._meetings.clear()

    def gather_shards(self, rank: int, tensor: torch.Tensor, peers: Group) -> list[torch.Tensor]:
        """Shard peers run in threads of this process (``HybridDenoiser``): each hands its
        tensor over and waits for the others'."""
        with self._lock:
            meeting = self._meetings.setdefault(peers, _Meeting(len(peers)))
            self._count(_nbytes([tensor]) * (len(peers) - 1))
        return meeting.exchange(peers.index(rank), tensor)


class DistTransport(Transport):
    """One rank per process over an initialised ``torch.distributed`` process group.

    ``spin``: wait for collectives by polling instead of sleeping. On a CPU machine where each
    worker owns its cores, a sleeping worker lets its core halt, and waking it again costs
    milliseconds on virtual machines: more than a short step's whole exchange. Polling (with a
    yield, so this worker's own communication threads run) keeps the core awake. It burns
    only the worker's own core, so it is only for workers with cores of their own.

    ``shared``: between ranks that see one shared memory (``shared.same_memory``), exchange
    predictions and cut tensors through it (``runtime.comm.shared``, ``runtime.comm.channel``);
    other links use the process group. ``links`` (also in the trace) says which each link took.
    """

    def __init__(
        self, groups: list[Group], spans: Spans | None = None, spin: bool = False, shared: bool = False, timeout_s: float = 300
    ) -> None:
        """``groups``: every broadcast group of the mesh, the same list on every rank (creating
        a process group is a collective over the whole world)."""
        super().__init__((dist.get_rank(),), spans)
        self.rank = dist.get_rank()
        self.spin, self._timeout_s = spin, timeout_s
        world = tuple(range(dist.get_world_size()))
        self._groups = {g: None if g == world else dist.new_group(list(g)) for g in groups if len(g) > 1}
        self._name = shm.shared_name() if shared else ""
        self._near = shm.same_memory(self._name) if shared else {self.rank}
        self._shared = {
            g: SharedExchange(g, self.rank, pg, timeout_s) for g, pg in self._groups.items() if self.rank in g and self._near.issuperset(g)
        }
        #: Each link's shared-memory channel, or None where it goes over the process group.
        self._channels: dict[tuple[int, int], SharedChannel | None] = {}
        self._pending: list[tuple[dist.Work, list[torch.Tensor]]] = []
        self._expected: dict[tuple[int, int], deque[tuple[list[dist.Work], list[torch.Tensor]]]] = defaultdict(deque)
        #: Messages a rank sends itself (a group leader standing in for its own stage).
        self._to_self: deque[list[torch.Tensor]] = deque()

    @property
    def links(self) -> dict[str, str]:
        """How each point-to-point link this rank used moves its tensors."""
        return self.spans.links

    def _channel(self, src: int, dst: int) -> SharedChannel | None:
        """The shared-memory channel of link ``src -> dst``, where both ends see one memory."""
        if (src, dst) not in self._channels:
            near = src in self._near and dst in self._near
            self._channels[(src, dst)] = SharedChannel(self._name, src, dst, src == self.rank, self._timeout_s) if near else None
            self.spans.links[f"{src}->{dst}"] = "shared memory" if near else dist.get_backend()
        return self._channels[(src, dst)]

    def post(self, src: int, dst: int, tensors: list[torch.Tensor]) -> None:
        if dst == self.rank:
            self._to_self.append(tensors)
            return
        channel = self._channel(src, dst)
        if channel is not None:
            with self.spans.span("send-recv", "shared send"):
                channel.send(tensors)
            self._count(_nbytes(tensors))
            return
        self._drain()
        with self.spans.span("send-recv", "isend"):
            tensors = [t.contiguous() for t in tensors]
            for t in tensors:
                self._pending.append((dist.isend(t, dst), tensors))
        self._count(_nbytes(tensors))

    def expect(self, src: int, dst: int, templates: list[torch.Tensor]) -> None:
        # gloo moves a message only once its receive is posted: posting it now lets the
        # transfer overlap the receiver's compute instead of starting the next step.
        if src == self.rank or self._channel(src, dst) is not None:
            return
        with self.spans.span("send-recv", "irecv"):
            out = [torch.empty_like(t) for t in templates]
            self._expected[(src, dst)].append(([dist.irecv(t, src) for t in out], out))

    def take(self, src: int, dst: int, templates: list[torch.Tensor]) -> list[torch.Tensor]:
        if src == self.rank:
            return self._to_self.popleft()
        channel = self._channel(src, dst)
        if channel is not None:
            with self.spans.span("wait", "cut tensors"):
                channel.arrive(templates)
            with self.spans.span("send-recv", "shared receive"):
                return channel.read(templates)
        if self._expected[(src, dst)]:
            works, out = self._expected[(src, dst)].popleft()
        else:
            with self.spans.span("send-recv", "irecv"):
                out = [torch.empty_like(t) for t in templates]
                works = [dist.irecv(t, src) for t in out]
        with self.spans.span("wait", "cut tensors"):
            for work in works:
                work.wait()  # point-to-point work cannot be polled on gloo
        return out

    def broadcast(self, value: torch.Tensor | None, src: int, template: torch.Tensor, group: Group) -> torch.Tensor:
        if len(group) == 1:
            assert value is not None
            return value
        if group in self._shared:
            sizes = [len(template) if r == src else 0 for r in group]
            (tensor,) = self._exchange(self._shared[group], value, sizes, template, "prediction")
        else:
            with self.spans.span("send-recv", "broadcast"):
                tensor = value.contiguous() if self.rank == src else torch.empty_like(template)
                work = dist.broadcast(tensor, src, group=self._groups[group], async_op=True)
            self._wait(work, "prediction")
        if self.rank == src:
            self._count(_nbytes([tensor]) * (len(group) - 1))
        return tensor

    def gather_rows(self, chunks: dict[int, torch.Tensor], sizes: list[int], group: Group, template: torch.Tensor) -> torch.Tensor:
        if len(group) == 1:
            return chunks[self.rank]
        mine = chunks.get(self.rank)
        if group in self._shared:
            parts = self._exchange(self._shared[group], mine, sizes, template, "predictions")
        else:
            parts = self._all_gather(mine, sizes, group, template)
        self._count_gather({self.rank: mine} if mine is not None and len(mine) else {}, group)
        return torch.cat(parts)

    def _exchange(
        self, shared: SharedExchange, mine: torch.Tensor | None, sizes: list[int], template: torch.Tensor, what: str
    ) -> list[torch.Tensor]:
        with self.spans.span("send-recv", "shared write"):
            shared.publish(mine, sizes, template)
        with self.spans.span("wait", what):
            shared.wait()
        with self.spans.span("send-recv", "shared read"):
            return shared.read(sizes, template)

    def _all_gather(self, mine: torch.Tensor | None, sizes: list[int], group: Group, template: torch.Tensor) -> list[torch.Tensor]:
        most = max(sizes)
        with self.spans.span("send-recv", "all-gather"):
            # all-gather moves equal sizes: members with fewer rows pad (nothing is counted for it)
            if mine is not None and len(mine) == most:
                padded = mine.contiguous()
            else:
                padded = template.new_zeros((most, *template.shape[1:]))
                if mine is not None:
                    padded[: len(mine)] = mine
            received = [torch.empty_like(padded) for _ in group]
            work = dist.all_gather(received, padded, group=self._groups[group], async_op=True)
        self._wait(work, "predictions")
        return [part[:n] for part, n in zip(received, sizes) if n]

    def gather_shards(self, rank: int, tensor: torch.Tensor, peers: Group) -> list[torch.Tensor]:
        received = [torch.empty_like(tensor) for _ in peers]
        with self.spans.span("send-recv", "shard all-gather"):
            work = dist.all_gather(received, tensor, group=self._groups[peers], async_op=True)
        self._wait(work, "shards")
        self._count(_nbytes([tensor]) * (len(peers) - 1))
        return received

    def gather_shards_later(self, rank: int, tensor: torch.Tensor, peers: Group) -> Any:
        received = [torch.empty_like(tensor) for _ in peers]
        work = dist.all_gather(received, tensor, group=self._groups[peers], async_op=True)
        self._count(_nbytes([tensor]) * (len(peers) - 1))
        return _Pending(work, received)

    def close(self, graceful: bool = True) -> None:
        for shared in self._shared.values():
            shared.close()
        for channel in self._channels.values():
            if channel is not None:
                channel.close(graceful)

    def barrier(self, group: Group) -> None:
        if len(group) > 1:
            dist.barrier(group=self._groups[group])

    def flush(self) -> None:
        # A send on gloo moves on this process's communication thread; finishing it while
        # this worker waits anyway keeps it from competing with the next step's compute.
        self._drain()

    def _wait(self, work: dist.Work, what: str) -> None:
        with self.spans.span("wait", what):
            if self.spin:
                while not work.is_completed():
                    os.sched_yield()
            work.wait()

    def _drain(self) -> None:
        if self._pending:
            with self.spans.span("wait", "earlier sends"):
                for work, _ in self._pending:
                    work.wait()
            self._pending.clear()
