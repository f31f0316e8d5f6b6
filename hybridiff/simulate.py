"""Predict a plan's run from its costs: latency per phase, bytes moved, per-rank timelines.

The compiler uses this to choose a mesh (the candidate with the least predicted latency for
the batch wins) and ``hybridiff simulate`` uses it to explain a plan. It costs the very step
programs the runtime executes (``hybridiff.program``): each action advances the clocks of the
positions taking part, collectives wait for the last of them. The window is assumed to start
at the expected tau1 (``tau_cap``); bytes are the programs' own, so they equal the run's.

Costs come from the plan: forwards measured at one row (``forward_s``), two rows
(``forward_batch2_s``) and, for batches, more (``forward_rows_s``) fix how compute grows with
rows: ``c(r) = c(1) * F(r) / F(1)`` with ``F`` interpolated linearly between the measured row
counts (and extended with the last slope); stage costs scale the same way. A transfer of
``n`` bytes takes ``n / link``; a broadcast costs one transfer whatever the group size (ring
and tree collectives pipeline it) but counts ``n`` bytes per receiver, as the runtime does.

Every step also pays the plan's measured ``step_costs``: the stock pipeline's own work (serial
runs too), and on replicas of several devices the synchronisation of the step (issuing the
exchange, waiting for the slowest peer, hybridiff's glue), measured on 2 devices and taken as
growing with the group's size like a ring, ``(g - 1)`` times.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hybridiff.files import write_atomic
from hybridiff.plan import RUN_PHASES, Mesh, PatchSplit, Phase, Plan, Schedule, StepCosts, link_bytes_per_s
from hybridiff.program.actions import (
    Action,
    BroadcastOutput,
    ExchangePredictions,
    Forward,
    JoinShards,
    Post,
    RunStage,
    ShardForward,
    StepProgram,
)
from hybridiff.program.build import ProgramBuilder, shard_forward_bytes
from hybridiff.program.layout import Layout
from hybridiff.program.timeline import CallSchedule


@dataclass(frozen=True)
class Workload:
    """What the simulator needs to know: the layout the programs are built from, and the
    measured costs of one row (one image, one branch)."""

    layout: Layout
    #: (rows, seconds) of whole forwards, sorted by rows, starting with one row.
    forward_by_rows: tuple[tuple[int, float], ...]
    stage_costs: tuple[float, ...]
    link_bytes_per_s: float
    step_costs: StepCosts = StepCosts()
    #: Guidance calls the denoiser once per branch (the serial baseline runs two forwards a step).
    two_calls: bool = False

    @classmethod
    def from_plan(cls, plan: Plan) -> Workload:
        est = plan.estimates
        return cls(
            layout=Layout.of(plan),
            forward_by_rows=forward_by_rows(est.forward_s, est.forward_batch2_s, est.forward_rows_s),
            stage_costs=tuple(s.cost_s for s in plan.stages),
            link_bytes_per_s=link_bytes_per_s(est.link_gbps),
            step_costs=est.step_costs,
            two_calls=plan.model.guidance_calls == "two-calls",
        )

    @property
    def forward_s(self) -> float:
        """One forward of one row."""
        return self.forward_by_rows[0][1]

    def compute(self, one_row_s: float, rows: int) -> float:
        """A computation that takes ``one_row_s`` on one row, on ``rows`` rows."""
        if rows == 0:
            return 0.0
        points = self.forward_by_rows
        (r0, f0), (r1, f1) = next(((a, b) for a, b in zip(points, points[1:]) if rows <= b[0]), points[-2:])
        grown = f0 + (rows - r0) * max(0.0, f1 - f0) / (r1 - r0)
        return one_row_s * grown / points[0][1] if points[0][1] > 0 else one_row_s * rows

    def transfer(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_s


@dataclass(frozen=True)
class Segment:
    rank: int
    start: float
    duration: float
    kind: str  # "full", "window" or "send"
    phase: str


def _zeros() -> dict[str, float]:
    return {p.value: 0 for p in RUN_PHASES}


@dataclass
class Simulation:
    mesh: str
    images: int
    latency_s: float = 0.0
    #: Seconds per phase on the slowest replica (its calls summed); the tau1 hand-off is
    #: timed with its step (warm-up) and its bytes are window traffic.
    phase_s: dict[str, float] = field(default_factory=_zeros)
    comm_bytes_by_phase: dict[str, int] = field(default_factory=_zeros)
    busy_s: dict[int, float] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)

    @property
    def comm_bytes(self) -> int:
        return sum(self.comm_bytes_by_phase.values())

    def as_dict(self) -> dict:
        return {
            "mesh": self.mesh,
            "images": self.images,
            "latency_s": self.latency_s,
            "images_per_s": self.images / self.latency_s if self.latency_s else None,
            "phase_s": self.phase_s,
            "comm_bytes": self.comm_bytes,
            "comm_bytes_by_phase": self.comm_bytes_by_phase,
            "busy_s": {str(r): b for r, b in sorted(self.busy_s.items())},
        }


def forward_by_rows(forward_s: float, forward_batch2_s: float, more: dict[int, float] | None = None) -> tuple[tuple[int, float], ...]:
    """The measured forward times as sorted (rows, seconds) points, one and two rows first."""
    return tuple(sorted({**(more or {}), 1: forward_s, 2: forward_batch2_s}.items()))


def simulate(mesh: Mesh, work: Workload, schedule: Schedule, images: int = 1) -> Simulation:
    """Predict generating ``images`` images with ``mesh`` (``work``'s stages on that mesh)."""
    sim = Simulation(mesh=mesh.label, images=images)
    sim.busy_s = dict.fromkeys(range(mesh.world_size), 0.0)
    builder = ProgramBuilder(work.layout.with_mesh(mesh))
    for replica, calls in enumerate(mesh.replica_images(images)):
        clock, phases = 0.0, _zeros()
        for call in calls:
            clock = _call(sim, phases, work, builder, schedule, replica, schedule.rows(len(call)), clock)
        if clock > sim.latency_s:  # the slowest replica sets the latency and its phases
            sim.latency_s, sim.phase_s = clock, phases
    return sim


def serial_latency(work: Workload, schedule: Schedule, images: int) -> float:
    """The stock pipeline on one device denoising all ``images`` in one call: one forward of
    both branches' rows a step, or one forward per branch where guidance makes two calls."""
    rows = schedule.rows(images)
    forwards = 2 if work.two_calls and rows > images else 1
    step = forwards * work.compute(work.forward_s, rows // forwards) + work.step_costs.pipeline_s
    return schedule.steps * step


def _call(
    sim: Simulation,
    phases: dict[str, float],
    work: Workload,
    builder: ProgramBuilder,
    schedule: Schedule,
    replica: int,
    rows: int,
    clock: float,
) -> float:
    """Add one pipeline call of ``rows`` rows on ``replica`` (its phase times to ``phases``);
    returns its end time."""
    timeline = CallSchedule(builder, schedule, schedule.steps, rows)
    for step in range(schedule.steps):
        program = timeline.program(step)
        phase = timeline.phase(step)
        costing = ProgramCost(work, builder.mesh, sim, replica, phase, clock)
        costing.add(program)
        if program.returns == "predictions" and (hand_off := timeline.observe(step, None)) is not None:
            costing.add(hand_off)
        end = costing.end + work.step_costs.pipeline_s
        phases[phase.value] += end - clock
        clock = end
    return clock


def step_seconds(work: Workload, program: StepProgram) -> float:
    """One step running ``program`` alone: its programs' time and the pipeline's own work."""
    costing = ProgramCost(work, work.layout.mesh, Simulation(mesh=work.layout.mesh.label, images=0), 0, Phase.WINDOW, 0.0)
    costing.add(program)
    return costing.end + work.step_costs.pipeline_s


class ProgramCost:
    """Clocks of one replica's positions through one step's programs. A position's own action
    (compute, a send) advances its clock; a collective starts when the last member arrives."""

    def __init__(self, work: Workload, mesh: Mesh, sim: Simulation, replica: int, phase: Phase, start: float) -> None:
        self.work, self.mesh, self.sim, self.replica, self.phase = work, mesh, sim, replica, phase
        self.clocks = dict.fromkeys(range(mesh.replica_size), start)
        self._costs: dict[type, Callable[[Action], float]] = {
            Forward: lambda a: work.compute(work.forward_s, len(a.rows)),
            ShardForward: self._shard_forward,
            RunStage: lambda a: work.compute(work.stage_costs[a.position], len(a.rows)),
            Post: lambda a: work.transfer(a.bytes),
            ExchangePredictions: lambda a: work.transfer(sum(a.sizes) * work.layout.prediction_bytes) + self._sync(a, "full"),
            BroadcastOutput: lambda a: work.transfer(a.rows * work.layout.prediction_bytes) + self._sync(a, "window"),
            JoinShards: lambda a: work.transfer(a.bytes // len(a.peers)),
        }

    @property
    def end(self) -> float:
        return max(self.clocks.values())

    def add(self, program: StepProgram) -> None:
        for action in program.actions:
            self.sim.comm_bytes_by_phase[action.phase.value] += action.bytes
            seconds = self._costs[type(action)](action) if type(action) in self._costs else 0.0
            members = action.positions
            start = max(self.clocks[p] for p in members) if len(members) > 1 else self.clocks[members[0]]
            for p in members:
                self.clocks[p] = start + seconds
            kind = {Forward: "full", ShardForward: "full", RunStage: "window", Post: "send"}.get(type(action))
            if kind is not None and seconds:
                for p in members:
                    rank = self.mesh.rank(self.replica, p)
                    self.sim.segments.append(Segment(rank, start, seconds, kind, self.phase.value))
                    self.sim.busy_s[rank] = self.sim.busy_s.get(rank, 0.0) + seconds

    def _sync(self, action: Action, kind: str) -> float:
        """The fixed cost of synchronising a step among the action's members."""
        costs = self.work.step_costs
        return (costs.full_sync_s if kind == "full" else costs.window_sync_s) * (len(action.positions) - 1)

    def _shard_forward(self, action: ShardForward) -> float:
        """One shard peer's forward of its share of ``action.rows``, with its exchanges.

        - Tokens (exact): the peer computes its image tokens and every text token; each attention
          first gathers the peers' image keys and values, and the output tokens are gathered.
        - Bands: the peer computes its rows; halos, group-norm statistics and self-attention keys
          and values cross bands. Exact steps wait for each; the other steps send them for the
          next step while computing, so only what is longer than the compute shows. The output
          band is gathered at once either way."""
        work, layout, sp = self.work, self.work.layout, self.mesh.sp
        rows, sync = len(action.rows), work.step_costs.full_sync_s
        compute = work.compute(work.forward_s, rows)
        sent = shard_forward_bytes(layout, rows)
        split = layout.split
        if not isinstance(split, PatchSplit):
            image, text = split.tokens, split.text_tokens
            waits = (split.attentions + 1) * sync * (sp - 1)
            return compute * (image / sp + text) / (image + text) + work.transfer(sent) + waits
        output = rows * layout.prediction_bytes * (sp - 1) // sp
        crossing, mine = sent - output, compute / sp
        if action.exact:
            seconds = mine + work.transfer(crossing) + (split.exchanges + 1) * sync * (sp - 1)
        else:
            seconds = max(mine, work.transfer(crossing)) + sync * (sp - 1)
        return seconds + work.transfer(output)


def plot_timeline(sim: Simulation, path: Path, title: str) -> None:
    """Draw each rank's busy time over the run (compute per phase, sends) to a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = {"full": "#4c72b0", "window": "#dd8452", "send": "#55a868"}
    ranks = sorted(sim.busy_s)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * len(ranks)))
    by_rank: dict[int, list[tuple[float, float]]] = defaultdict(list)
    kinds: dict[int, list[str]] = defaultdict(list)
    for seg in sim.segments:
        by_rank[seg.rank].append((seg.start, seg.duration))
        kinds[seg.rank].append(colours[seg.kind])
    for r in ranks:
        ax.broken_barh(by_rank[r], (r - 0.4, 0.8), facecolors=kinds[r] or None)
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"{title}: {sim.mesh}, {sim.images} image(s), predicted {sim.latency_s:.3f} s", fontsize=9)
    labels = {"full": "full forward (its rows)", "window": "window stage", "send": "send cut tensors"}
    handles = [Patch(color=c, label=labels[k]) for k, c in colours.items()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
