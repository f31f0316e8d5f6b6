"""Who sends which cut tensors to whom inside the window: static routing, worked out from the
plan alone (and a call's row count), apart from the per-step execution in ``denoiser``.

Positions are a replica's mesh positions; the denoiser maps them to ranks. Every answer is
memoised per (position, rows, first step), since a window step asks twice (receive now,
pre-post the next)."""

from __future__ import annotations

from hybridiff.errors import HybridiffError
from hybridiff.plan import CutTensor, Plan, receives_next

#: Per link into a position: its cut tensors, and (source position, rows) of each message.
Incoming = list[tuple[list[CutTensor], list[tuple[int, int]]]]


def overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), max(max(a.start, b.start), min(a.stop, b.stop)))


class Routing:
    def __init__(self, plan: Plan) -> None:
        self.mesh = plan.mesh
        self.window_guidance = plan.schedule.window_guidance
        #: (producer stage, consumer stage) -> cut tensors, in plan order (the wire order).
        self.links = plan.links()
        #: Shape arithmetic crossing cuts: static, taken from the plan instead of the wire.
        self.constants = [c for c in plan.cut_tensors if c.constant is not None]
        self.output_stage = plan.output_stage
        self._incoming: dict[tuple[int, int, bool], Incoming] = {}

    def window_rows(self, position: int, rows: int) -> range:
        return self.mesh.window_rows(position, rows, self.window_guidance)

    def receives_next(self, consumer: int, next_is_last: bool) -> bool:
        """Whether ``consumer``'s stage reads cut tensors on the next window step (on the last
        one only the output's stage runs)."""
        return receives_next(consumer, self.output_stage, next_is_last)

    def check_rows(self, rows: int) -> None:
        """Cut tensors without a batch dimension (graphs specialised to one row) allow one row
        per stage only."""
        fixed = [c.node for cuts in self.links.values() for c in cuts if c.batch_dim is None]
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
        for (producer, consumer), cuts in self.links.items():
            if consumer != position:
                continue
            needed = self.window_rows(producer, rows)
            if first:
                sources = [
                    (m, len(part))
                    for m in range(self.mesh.replica_size)
                    if (part := overlap(self.mesh.full_rows(m, rows), needed))
                ]
            else:
                sources = [(producer, len(needed))]
            found.append((cuts, sources))
        return found

    def hand_off(self, position: int, rows: int, next_is_last: bool) -> list[tuple[int, list[CutTensor], range]]:
        """After tau1's full step: (consumer, cuts, rows out of ``position``'s full rows) it sends
        for the window's first step."""
        mine = self.mesh.full_rows(position, rows)
        sends = []
        for (producer, consumer), cuts in self.links.items():
            part = overlap(mine, self.window_rows(producer, rows))
            if part and self.receives_next(consumer, next_is_last):
                sends.append((consumer, cuts, range(part.start - mine.start, part.stop - mine.start)))
        return sends
