"""Executes step programs (``hybridiff.program``) for the positions of one replica this process
hosts: every rank of the replica in the emulation, one rank in a worker.

Each action is done by the hosted positions that take part in it (``Action.positions``): a
worker does its own rank's list, the emulation the whole list in order. The bytes the
transport sends during an action are counted under the action's phase, and every action done
is logged with the bytes sent during it (``executed``), so a run can be compared with the
program it was given."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch

from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.pipeline import TracedModel
from hybridiff.graph.rows import rows_of
from hybridiff.plan import CutTensor, Execution, Phase, Plan
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
from hybridiff.runtime.comm.transport import Transport
from hybridiff.runtime.execution.sequence import ShardedForwards


class Executor:
    """Runs step programs on a traced graph over ``transport``, for ``replica``'s hosted positions."""

    def __init__(
        self, traced: TracedModel, plan: Plan, transport: Transport, replica: int = 0, execution: Execution | None = None
    ) -> None:
        """``execution``: how the programs run [default: the plan's]."""
        self.plan, self.mesh, self.transport = plan, plan.mesh, transport
        device = next((p.device for p in traced.denoiser.parameters()), None)
        self.runner = GraphRunner(traced.graph, execution or plan.execution, device)
        self.ranks = self.mesh.replica_ranks(replica)
        self.hosted = {s for s, r in enumerate(self.ranks) if r in transport.hosted}
        self.cuts = {c.node: c for c in plan.cut_tensors}
        #: Shape arithmetic crossing cuts: static, taken from the plan instead of the wire.
        self.constants = [c for c in plan.cut_tensors if c.constant is not None]
        compute = [n.name for n in traced.graph.graph.nodes if n.op != "placeholder"]
        self.full = self.runner.program(compute, keep=list(self.cuts))
        self.stage_programs = {
            s.index: self.runner.program(s.recompute + s.nodes, keep=[c.node for c in plan.cut_tensors if c.producer == s.index])
            for s in plan.stages
        }
        self.sharded = ShardedForwards(self.runner, plan, transport, self.ranks) if self.mesh.sp > 1 else None
        self._handlers: dict[type, Callable[[Any, list[int]], None]] = {
            Forward: self._forward, ShardForward: self._shard_forward, ExchangePredictions: self._exchange,
            JoinShards: self._join, Expect: self._expect, Post: self._post, Take: self._take, RunStage: self._run_stage,
            BroadcastOutput: self._broadcast, Flush: lambda action, hosted: self.transport.flush(),
        }  # fmt: skip
        self.begin_call()

    def begin_call(self) -> None:
        #: The actions done in this call, in order, each with the bytes the transport sent
        #: during it; and the bytes sent per phase.
        self.executed: list[tuple[Action, int]] = []
        self.sent: Counter[Phase] = Counter()
        #: Per hosted position: the values of its last full forward (they feed the window).
        self.last_full: dict[int, dict[str, Any]] = {}
        if self.sharded is not None:
            self.sharded.begin_call()

    def run(self, program: StepProgram, inputs: dict[str, Any], latent: torch.Tensor) -> torch.Tensor | None:
        """Do this process's part of ``program`` on a call's graph ``inputs``; returns what the
        program returns (the predictions, or the window's one prediction), None for a hand-off."""
        self._inputs, self._latent, self._rows = inputs, latent, latent.shape[0]
        self._taken: dict[int, dict[str, Any]] = {}
        self._stage_values: dict[int, dict[str, Any]] = {}
        self._result: torch.Tensor | None = None
        for action in program.actions:
            hosted = [p for p in action.positions if p in self.hosted]
            if hosted:
                before = self.transport.sent_bytes
                self._handlers[type(action)](action, hosted)
                sent = self.transport.sent_bytes - before
                self.sent[action.phase] += sent
                self.executed.append((action, sent))
        return self._result

    def _like(self, rows: int) -> torch.Tensor:
        """A receive buffer for ``rows`` rows of the prediction."""
        return torch.empty_like(self._latent[:rows])

    def _templates(self, cuts: tuple[str, ...], rows: int) -> list[torch.Tensor]:
        """Receive buffers shaped as the plan records, for ``rows`` rows."""
        device = self._latent.device
        return [torch.empty(self.cuts[c].row_shape(rows), dtype=getattr(torch, self.cuts[c].dtype), device=device) for c in cuts]

    def _forward(self, action: Forward, hosted: list[int]) -> None:
        with self.transport.spans.span("compute", f"forward {len(action.rows)} row(s)"):
            values = self.runner.run(self.full, rows_of(self._inputs, action.rows, self._rows))
        if action.check:
            self._check_cuts(values, len(action.rows))
        self.last_full[action.position] = values

    def _shard_forward(self, action: ShardForward, hosted: list[int]) -> None:
        envs = {s: rows_of(self._inputs, action.rows, self._rows) for s in hosted}
        with self.transport.spans.span("compute", "shard-parallel forward"):
            done = self.sharded.run(envs, action.exact)
        for values in done.values():
            if action.check:
                self._check_cuts(values, len(action.rows))
        self.last_full.update(done)

    def _exchange(self, action: ExchangePredictions, hosted: list[int]) -> None:
        chunks = {self.ranks[s]: self.last_full[s]["output"] for s in hosted if action.sizes[s]}
        group = tuple(self.ranks[m] for m in action.members)
        self._result = self.transport.gather_rows(chunks, list(action.sizes), group, self._like(1))

    def _join(self, action: JoinShards, hosted: list[int]) -> None:
        self.sharded.unshard({s: self.last_full[s] for s in hosted}, action.cuts)

    def _expect(self, action: Expect, hosted: list[int]) -> None:
        self.transport.expect(self.ranks[action.src], self.ranks[action.dst], self._templates(action.cuts, action.rows))

    def _post(self, action: Post, hosted: list[int]) -> None:
        if action.part is None:
            values, part, total = self._stage_values[action.src], None, action.rows
        else:
            values, part = self.last_full[action.src], action.part
            total = len(self.mesh.full_rows(action.src, self._rows))
        tensors = [_narrow(values[c], self.cuts[c], part, total) for c in action.cuts]
        self.transport.post(self.ranks[action.src], self.ranks[action.dst], tensors)

    def _take(self, action: Take, hosted: list[int]) -> None:
        dst = self.ranks[action.dst]
        parts = [self.transport.take(self.ranks[src], dst, self._templates(action.cuts, n)) for src, n in action.sources]
        env = self._taken.setdefault(action.dst, {})
        for i, cut in enumerate(action.cuts):
            env[cut] = parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts], self.cuts[cut].batch_dim)

    def _run_stage(self, action: RunStage, hosted: list[int]) -> None:
        rows = len(action.rows)
        env = {
            **rows_of(self._inputs, action.rows, self._rows),
            **{c.node: c.runtime_value(rows) for c in self.constants},
            **self._taken.get(action.position, {}),
        }
        with self.transport.spans.span("compute", f"stage {action.position}"):
            self._stage_values[action.position] = self.runner.run(self.stage_programs[action.position], env)

    def _broadcast(self, action: BroadcastOutput, hosted: list[int]) -> None:
        mine = self._stage_values.get(action.src, {}).get("output")
        group = tuple(self.ranks[m] for m in action.members)
        self._result = self.transport.broadcast(mine, self.ranks[action.src], self._like(action.rows), group)

    def _check_cuts(self, values: dict[str, Any], rows: int) -> None:
        """The cut tensors the model computes have the shapes and dtypes the plan gives them, so
        every receive buffer fits its message. Checked on each call's first step, before any
        cut tensor is sent: an edited plan (a cut's shape, dtype or the image size) stops here."""
        split = self.plan.graph.shard_split if self.mesh.sp > 1 else None
        for c in self.plan.cut_tensors:
            value = values.get(c.node)
            if c.constant is not None or not isinstance(value, torch.Tensor):
                continue
            shape = c.shard_shape(rows, split, self.mesh.sp) if split is not None else c.row_shape(rows)
            expected = (shape, c.dtype)
            found = (list(value.shape), str(value.dtype).removeprefix("torch."))
            if found != expected:
                size = f"{self.plan.model.height}x{self.plan.model.width}"
                raise HybridiffError(
                    f"cut tensor {c.node} is {found[1]} {found[0]} for {rows} row(s) at {size}, but the plan says "
                    f"{expected[1]} {expected[0]}: the plan was edited or compiled for another size or dtype; recompile it"
                )


def _narrow(value: torch.Tensor, cut: CutTensor, part: range | None, total: int) -> torch.Tensor:
    """Rows ``part`` of a cut tensor computed for ``total`` rows (all of it when None;
    ``Routing.check_rows`` has refused cuts without a batch dimension wherever rows must split)."""
    if part is None or len(part) == total:
        return value
    return value.narrow(cut.batch_dim, part.start, len(part))
