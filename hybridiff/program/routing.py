"""Who sends which cut tensors to whom around the window: static routing, worked out from a
layout alone (and a call's row count). The program builder asks it; neither the runtime nor
the simulator works routing out for themselves.

Positions are a replica's mesh positions. Every answer is memoised per (position, rows, first
step), since a window step asks twice (receive now, pre-post the next)."""

from __future__ import annotations

from hybridiff.errors import HybridiffError
from hybridiff.program.layout import Layout, Link

#: Per link into a position: the link, and (source position, rows) of each message on it.
Incoming = list[tuple[Link, list[tuple[int, int]]]]


def overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), max(max(a.start, b.start), min(a.stop, b.stop)))


class Routing:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.mesh = layout.mesh
        self._incoming: dict[tuple[int, int, bool], Incoming] = {}

    def window_rows(self, position: int, rows: int) -> range:
        return self.mesh.window_rows(position, rows, self.layout.window_guidance)

    def receives_next(self, consumer: int, next_is_last: bool) -> bool:
        """Whether stage ``consumer`` reads cut tensors on the next window step. On the window's
        last step only the stage that holds the output runs, so nothing is sent to the others: a
        message no step reads would be left queued into the next pipeline call."""
        return not next_is_last or consumer == self.layout.output_stage

    def check_rows(self, rows: int) -> None:
        """Cut tensors without a batch dimension (graphs specialised to one row) allow one row
        per stage only."""
        fixed = self.layout.unbatched
        if fixed and any(len(self.window_rows(s, rows)) > 1 for s in range(self.mesh.replica_size)):
            raise HybridiffError(
                f"cut tensor {fixed[0]} has no batch dimension, so a stage cannot run several rows; "
                "compile a cfg=2 mesh and generate one image per call (--batch 1)"
            )

    def incoming(self, position: int, rows: int, first: bool) -> Incoming:
        """What ``position``'s stage receives on a window step. On the window's first step the
        sources are the positions whose full forwards computed the producing stage's rows."""
        key = (position, rows, first)
        if key not in self._incoming:
            self._incoming[key] = self._work_out_incoming(position, rows, first)
        return self._incoming[key]

    def _work_out_incoming(self, position: int, rows: int, first: bool) -> Incoming:
        found = []
        for link in self.layout.links:
            if link.consumer != position:
                continue
            needed = self.window_rows(link.producer, rows)
            if first:
                sources = [
                    (m, len(part))
                    for m in range(self.mesh.replica_size)
                    if (part := overlap(self.mesh.full_rows(m, rows), needed))
                ]
            else:
                sources = [(link.producer, len(needed))]
            found.append((link, sources))
        return found

    def hand_off(self, position: int, rows: int, next_is_last: bool) -> list[tuple[Link, range]]:
        """After tau1's full step: each link ``position`` sends on for the window's first step,
        with the rows it takes out of ``position``'s full rows."""
        mine = self.mesh.full_rows(position, rows)
        sends = []
        for link in self.layout.links:
            part = overlap(mine, self.window_rows(link.producer, rows))
            if part and self.receives_next(link.consumer, next_is_last):
                sends.append((link, range(part.start - mine.start, part.stop - mine.start)))
        return sends
