"""Step programs from a layout: what every position of a replica does in a full step, in the
tau1 hand-off and in a window step, with the bytes each action puts on the wire.

This is the one place the schedule is written down. The runtime executes these programs and
the simulator costs them; a new way of running a step is a new method here (and, where it
needs one, a new action kind), not a change to both."""

from __future__ import annotations

from functools import lru_cache

from hybridiff.plan import PatchSplit, Phase
from hybridiff.program.actions import (
    Action,
    BroadcastOutput,
    ExchangePredictions,
    Expect,
    Flush,
    Forward,
    JoinShards,
    Post,
    RunStage,
    ShardForward,
    StepProgram,
    Take,
)
from hybridiff.program.layout import Layout
from hybridiff.program.routing import Routing


def shard_forward_bytes(layout: Layout, rows: int) -> int:
    """What one of ``sp`` shard peers sends in a shard forward of ``rows`` rows (exact or not:
    stale band steps post the same values, for the next step). Tokens: its image tokens' keys
    and values to every peer, and its output tokens. Bands: halos and group-norm statistics to
    every peer, its keys and values, and its output band."""
    sp, split = layout.mesh.sp, layout.split
    share = rows * layout.prediction_bytes * (sp - 1) // sp
    if isinstance(split, PatchSplit):
        crossing = (split.halo_bytes_per_row + split.stats_bytes_per_row) * (sp - 1) + split.kv_bytes_per_row * (sp - 1) // sp
        return rows * crossing + share
    return rows * split.kv_bytes_per_row * (sp - 1) // sp + share


class ProgramBuilder:
    """Builds (and remembers) the step programs of one replica of ``layout``'s mesh."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.mesh = layout.mesh
        self.routing = Routing(layout)
        self.positions = tuple(range(self.mesh.replica_size))
        # Programs depend on a handful of flags: one per combination, built on first use.
        self.full_step = lru_cache(maxsize=None)(self._full_step)
        self.hand_off = lru_cache(maxsize=None)(self._hand_off)
        self.window_step = lru_cache(maxsize=None)(self._window_step)

    def _full_step(self, rows: int, phase: Phase, exact: bool = True, check: bool = False) -> StepProgram:
        """Condition partitioning: each position runs the whole graph on the rows it computes
        (``Mesh.computed_rows``), then every position's predictions go to every position.
        ``exact``: shard peers exchange this step's values; ``check``: the call's first step
        compares the cut tensors with the plan before any is sent."""
        mesh, actions = self.mesh, []
        for s in self.positions:
            mine = mesh.computed_rows(s, rows)
            if not mine or mesh.shard_index(s):
                continue
            if mesh.sp > 1:
                peers = mesh.shard_peers(s)
                sent = shard_forward_bytes(self.layout, len(mine)) * len(peers)
                actions.append(ShardForward(phase=phase, peers=peers, rows=mine, exact=exact, check=check, bytes=sent))
            else:
                actions.append(Forward(phase=phase, position=s, rows=mine, check=check))
        sizes = tuple(len(mesh.full_rows(s, rows)) for s in self.positions)
        sent = sum(sizes) * self.layout.prediction_bytes * (len(sizes) - 1)
        actions.append(ExchangePredictions(phase=phase, members=self.positions, sizes=sizes, bytes=sent))
        about = {"rows": rows, "exact": exact, "check": check}
        return StepProgram("full step", tuple(actions), returns="predictions", about=about)

    def _hand_off(self, rows: int, next_is_last: bool) -> StepProgram:
        """After tau1's full step: each position sends on the cut tensors of the rows it holds
        whole that the window's first step reads (counted as window traffic). Shard peers first
        join their shares; every receive is posted before any send (gloo moves a message once
        both ends have posted it)."""
        mesh, layout, actions = self.mesh, self.layout, []
        phase = Phase.WINDOW
        if layout.shard_cuts:
            for s in self.positions:
                mine = mesh.computed_rows(s, rows)
                if mine and not mesh.shard_index(s):
                    peers = mesh.shard_peers(s)
                    sent = len(mine) * layout.shard_bytes_per_row * (len(peers) - 1) * len(peers)
                    actions.append(JoinShards(phase=phase, peers=peers, rows=mine, cuts=layout.shard_cuts, bytes=sent))
        for s in self.positions:
            actions += self._expects(s, rows, first=True, next_is_last=next_is_last)
        for s in self.positions:
            for link, part in self.routing.hand_off(s, rows, next_is_last):
                sent = 0 if link.consumer == s else link.bytes_per_row * len(part)
                actions.append(Post(phase=phase, src=s, dst=link.consumer, cuts=link.cuts, rows=len(part), part=part, bytes=sent))
        return StepProgram("hand-off", tuple(actions), about={"rows": rows, "next_is_last": next_is_last})

    def _window_step(self, rows: int, first: bool = False, last: bool = False, next_is_last: bool = False) -> StepProgram:
        """Every stage at once on its window rows, from the cut tensors sent one step earlier
        (``first``: those of the hand-off), sending its own on for the next step; then the
        output stage's prediction goes to every position. On the window's ``last`` step only
        the output's stage runs and nothing is sent on; before it (``next_is_last``) only what
        that stage reads is sent."""
        actions: list[Action] = []
        phase = Phase.WINDOW
        for s in self.positions:
            if last and s != self.layout.output_stage:
                continue  # nothing it would produce is read any more
            for link, sources in self.routing.incoming(s, rows, first):
                actions.append(Take(phase=phase, dst=s, sources=tuple(sources), cuts=link.cuts))
            if not last:
                actions += self._expects(s, rows, first=False, next_is_last=next_is_last)
            mine = self.routing.window_rows(s, rows)
            actions.append(RunStage(phase=phase, position=s, rows=mine))
            if not last:
                actions += self._posts(s, len(mine), next_is_last)
        out = len(self.routing.window_rows(self.layout.output_stage, rows))
        sent = out * self.layout.prediction_bytes * (len(self.positions) - 1)
        actions.append(BroadcastOutput(phase=phase, src=self.layout.output_stage, members=self.positions, rows=out, bytes=sent))
        actions.append(Flush(phase=phase, members=self.positions))
        returns = "prediction" if self.mesh.cfg == 1 else self.layout.window_guidance
        about = {"rows": rows, "first": first, "last": last, "next_is_last": next_is_last}
        return StepProgram("window step", tuple(actions), returns=returns, about=about)

    def _expects(self, position: int, rows: int, first: bool, next_is_last: bool) -> list[Action]:
        """Pre-posted receives of the next window step's cut tensors into ``position`` (if it
        reads any then)."""
        if not self.routing.receives_next(position, next_is_last):
            return []
        return [
            Expect(phase=Phase.WINDOW, src=src, dst=position, cuts=link.cuts, rows=n)
            for link, sources in self.routing.incoming(position, rows, first)
            for src, n in sources
        ]

    def _posts(self, position: int, rows: int, next_is_last: bool) -> list[Action]:
        """``position``'s stage values of this window step to the stages that read them next."""
        return [
            Post(phase=Phase.WINDOW, src=position, dst=link.consumer, cuts=link.cuts, rows=rows, bytes=link.bytes_per_row * rows)
            for link in self.layout.links
            if link.producer == position and self.routing.receives_next(link.consumer, next_is_last)
        ]
