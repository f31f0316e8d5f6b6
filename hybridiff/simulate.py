"""Predict a plan's run from its costs: latency per phase, bytes moved, per-rank timelines.

The compiler uses this to choose a mesh (the candidate with the least predicted latency for
the batch wins) and ``hybridiff simulate`` uses it to explain a plan. Both follow the rules the
runtime executes, read from the same ``Mesh`` methods: which rows each rank computes on a
fully connected step, which rows each stage runs in the window, which cut tensors move at the
hand-off after tau1. The window is assumed to start at the expected tau1 (``tau_cap``).

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

from hybridiff.files import write_atomic
from hybridiff.plan import Mesh, PatchSplit, Plan, Schedule, StepCosts, TokenSplit, receives_next

#: Phases of one image as the paper names them, and the traffic classes the runtime counts.
PHASES = ("warm-up", "window", "fully-connecting")


@dataclass(frozen=True)
class Workload:
    """What the simulator needs to know about the model, per row (one image, one branch)."""

    #: (rows, seconds) of whole forwards, sorted by rows, starting with one row.
    forward_by_rows: tuple[tuple[int, float], ...]
    stage_costs: tuple[float, ...]
    #: (producing stage, consuming stage, bytes per row) of every tensor that crosses a cut.
    links: tuple[tuple[int, int, int], ...]
    output_stage: int
    prediction_bytes: int
    link_bytes_per_s: float
    step_costs: StepCosts = StepCosts()
    #: The image tokens sequence parallelism splits (``Mesh.sp``), if the graph has them.
    tokens: TokenSplit | None = None
    #: What a UNet's row bands exchange (``Mesh.sp`` on UNets), if the graph allows it.
    patches: PatchSplit | None = None

    @classmethod
    def from_plan(cls, plan: Plan) -> Workload:
        est = plan.estimates
        return cls(
            forward_by_rows=forward_by_rows(est.forward_s, est.forward_batch2_s, est.forward_rows_s),
            stage_costs=tuple(s.cost_s for s in plan.stages),
            links=tuple((p, c, sum(t.bytes for t in cuts)) for (p, c), cuts in plan.links().items()),
            output_stage=plan.output_stage,
            prediction_bytes=est.prediction_bytes,
            link_bytes_per_s=est.link_gbps * 1e9 / 8,
            step_costs=est.step_costs,
            tokens=plan.graph.tokens,
            patches=plan.graph.patches,
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

    def sync(self, mesh: Mesh, window: bool) -> float:
        """The fixed cost of synchronising one step within a replica of ``mesh``."""
        costs = self.step_costs
        return (costs.window_sync_s if window else costs.full_sync_s) * (mesh.replica_size - 1)


@dataclass(frozen=True)
class Segment:
    rank: int
    start: float
    duration: float
    kind: str  # "full", "window" or "send"
    phase: str


@dataclass
class Simulation:
    mesh: str
    images: int
    latency_s: float = 0.0
    #: Seconds per phase on the slowest replica (its calls summed).
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    comm_bytes_by_phase: dict[str, int] = field(default_factory=lambda: {"cond-partition": 0, "pipeline": 0})
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
    """Predict generating ``images`` images with ``mesh``."""
    sim = Simulation(mesh=mesh.label, images=images)
    sim.busy_s = dict.fromkeys(range(mesh.world_size), 0.0)
    for replica, calls in enumerate(mesh.replica_images(images)):
        clock, phases = 0.0, dict.fromkeys(PHASES, 0.0)
        for call in calls:
            clock = _call(sim, phases, mesh, work, schedule, replica, len(call), clock)
        if clock > sim.latency_s:  # the slowest replica sets the latency and its phases
            sim.latency_s, sim.phase_s = clock, phases
    return sim


def serial_latency(work: Workload, schedule: Schedule, images: int) -> float:
    """The stock pipeline on one device denoising all ``images`` in one call."""
    step = work.compute(work.forward_s, schedule.rows(images)) + work.step_costs.pipeline_s
    return schedule.steps * step


#: Per position: (compute seconds, send seconds); the seconds every position spends after the
#: slowest one (exchange, synchronisation, the pipeline's own work); bytes sent.
_Step = tuple[dict[int, tuple[float, float]], float, int]


def window_step(
    mesh: Mesh, work: Workload, rows: int, window_guidance: str, last: bool = False, next_is_last: bool = False
) -> _Step:
    """One window step of a call of ``rows`` rows: every stage at once, then the output's
    broadcast. On the last window step only the output's stage runs and nothing is sent on;
    before it, only what that stage reads is sent."""
    busy, sent_total = {}, 0
    for s in range(mesh.replica_size):
        mine = len(mesh.window_rows(s, rows, window_guidance))
        runs = not last or s == work.output_stage
        compute = work.compute(work.stage_costs[s], mine) if runs else 0.0
        live = [b for p, c, b in work.links if p == s and receives_next(c, work.output_stage, next_is_last)]
        sent = 0 if last else sum(live) * mine
        busy[s] = (compute, work.transfer(sent))
        sent_total += sent
    out = len(mesh.window_rows(work.output_stage, rows, window_guidance)) * work.prediction_bytes
    tail = work.transfer(out) + work.sync(mesh, window=True) + work.step_costs.pipeline_s
    return busy, tail, sent_total + out * (mesh.replica_size - 1)


def full_step(mesh: Mesh, work: Workload, rows: int, exact: bool = True) -> _Step:
    """One fully connected step: each position runs the rows it owns whole and broadcasts
    its predictions to the replica. With ``sp > 1`` shard peers split the rows' compute and
    exchange what crosses their shards (``_shard_exchange``)."""
    busy, tail, sent = {}, work.sync(mesh, window=False) + work.step_costs.pipeline_s, 0
    for s in range(mesh.replica_size):
        computed = len(mesh.computed_rows(s, rows))
        compute = work.compute(work.forward_s, computed)
        if mesh.sp > 1 and computed:
            compute, exchanged = _shard_exchange(mesh, work, computed, compute, exact)
            sent += exchanged
        mine = len(mesh.full_rows(s, rows))
        busy[s] = (compute, 0.0)
        tail += work.transfer(mine * work.prediction_bytes)
        sent += mine * work.prediction_bytes * (mesh.replica_size - 1)
    return busy, tail, sent


def _shard_exchange(mesh: Mesh, work: Workload, rows: int, compute: float, exact: bool) -> tuple[float, int]:
    """(seconds, bytes sent) of one shard peer's forward of ``rows`` rows (whole: ``compute``).

    - Tokens (exact): the peer computes its image tokens and every text token; each attention
      first gathers the peers' image keys and values, and the output tokens are gathered.
    - Bands: the peer computes its rows; halos, group-norm statistics and self-attention keys
      and values cross bands. Exact steps wait for each; the other steps send them for the next
      step while computing, so only what is longer than the compute shows. The output band is
      gathered at once either way."""
    sp, sync = mesh.sp, work.step_costs.full_sync_s
    output = rows * work.prediction_bytes * (sp - 1) // sp
    if work.tokens is not None:
        image, text = work.tokens.tokens, work.tokens.text_tokens
        gathered = rows * work.tokens.kv_bytes_per_row * (sp - 1) // sp + output
        waits = (work.tokens.attentions + 1) * sync * (sp - 1)
        return compute * (image / sp + text) / (image + text) + work.transfer(gathered) + waits, gathered
    p = work.patches
    crossing = rows * ((p.halo_bytes_per_row + p.stats_bytes_per_row) * (sp - 1) + p.kv_bytes_per_row * (sp - 1) // sp)
    mine = compute / sp
    if exact:
        seconds = mine + work.transfer(crossing) + (p.exchanges + 1) * sync * (sp - 1)
    else:
        seconds = max(mine, work.transfer(crossing)) + sync * (sp - 1)
    return seconds + work.transfer(output), crossing + output


def hand_off_bytes(
    mesh: Mesh, work: Workload, rows: int, window_guidance: str, position: int, next_is_last: bool = False
) -> int:
    """Bytes ``position`` sends after tau1: the cut values of the window's first step that its
    full forward computed, to every other position whose stage consumes them."""
    sent = 0
    mine = set(mesh.full_rows(position, rows))
    for producer, consumer, b in work.links:
        if consumer != position and receives_next(consumer, work.output_stage, next_is_last):
            sent += b * len(mine & set(mesh.window_rows(producer, rows, window_guidance)))
    return sent


def step_seconds(step: _Step) -> float:
    busy, tail, _ = step
    return max(c + t for c, t in busy.values()) + tail


def _call(
    sim: Simulation,
    phases: dict[str, float],
    mesh: Mesh,
    work: Workload,
    schedule: Schedule,
    replica: int,
    images: int,
    clock: float,
) -> float:
    """Add one pipeline call of ``images`` images on ``replica`` (its phase times to ``phases``);
    returns its end time."""
    rows = schedule.rows(images)
    tau1 = schedule.expected_tau1
    k = schedule.window_steps(tau1)
    wg = schedule.window_guidance
    full_steps = 0
    for step in range(schedule.steps):
        phase = "warm-up" if step <= tau1 else "window" if step <= tau1 + k else "fully-connecting"
        if phase == "window" and mesh.replica_size > 1:  # one stage: a window step is a full one
            busy, tail, sent = window_step(mesh, work, rows, wg, last=step == tau1 + k, next_is_last=step + 1 == tau1 + k)
            sim.comm_bytes_by_phase["pipeline"] += sent
        else:
            split = work.patches or work.tokens
            exact = split is None or split.exact(full_steps, step, tau1 + k if k else None)
            busy, tail, sent = full_step(mesh, work, rows, exact=exact)
            full_steps += 1
            sim.comm_bytes_by_phase["cond-partition"] += sent
            if k and step == tau1:
                for s, (compute, _) in busy.items():
                    handed = hand_off_bytes(mesh, work, rows, wg, s, next_is_last=k == 1)
                    sim.comm_bytes_by_phase["pipeline"] += handed
                    busy[s] = (compute, work.transfer(handed))
        for s, (compute, send) in busy.items():
            rank = mesh.rank(replica, s)
            if compute:
                sim.segments.append(Segment(rank, clock, compute, "window" if phase == "window" else "full", phase))
            if send:
                sim.segments.append(Segment(rank, clock + compute, send, "send", phase))
            sim.busy_s[rank] += compute + send
        duration = step_seconds((busy, tail, sent))
        phases[phase] += duration
        clock += duration
    return clock


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
