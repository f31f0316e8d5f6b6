"""The execution plan: the one contract between the compiler and the runtime.

The compiler decides everything here (which rank serves which guidance branch, which graph
nodes each stage owns, which tensors cross stages, the phase-switching schedule) and the
runtime validates and executes it without re-deciding. Plans are plain JSON so they can be
inspected, diffed, stored next to a model and shipped to every node of a cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hybridiff.errors import HybridiffError
from hybridiff.files import write_atomic

FORMAT_VERSION = 2


def imbalance(stage_costs: Sequence[float]) -> float:
    """Slowest stage compute over mean stage compute (1.0 is perfect balance)."""
    return max(stage_costs) / (sum(stage_costs) / len(stage_costs))

#: What a mesh position computes: one guidance branch (cfg = 2) or the whole CFG batch (cfg = 1).
Branch = Literal["uncond", "cond", "both"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """What the plan was compiled from: ``builtin:NAME``, a local diffusers folder,
    ``arch:NAME`` (a published architecture, no weights) or ``python:CLASS`` (the Python API)."""

    source: str
    denoiser: Literal["unet", "sd3-transformer", "custom"] = "unet"
    #: Pixels; latents are 1/8 of the image, so both are multiples of 8.
    height: int | None = Field(default=None, gt=0, multiple_of=8, description="image height in pixels the plan was costed for")
    width: int | None = Field(default=None, gt=0, multiple_of=8)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    #: Extra arguments of every pipeline call, from the model's card (e.g. SD3's
    #: ``max_sequence_length``): they fix input shapes the plan was costed for.
    pipeline_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)


class TokenSplit(_Strict):
    """Where a transformer denoiser's image tokens form one sequence that only attention mixes:
    sequence parallelism (``Mesh.sp``) cuts it after ``shard_after`` and joins it after
    ``gather_after`` (``runtime.sequence``)."""

    shard_after: str = Field(description="the node giving the image tokens [rows, tokens, dim] (patch embedding)")
    gather_after: str = Field(description="the last per-token node before the tokens are unpatchified")
    tokens: int = Field(gt=0, description="image tokens per row")
    text_tokens: int = Field(default=0, ge=0, description="text tokens per row, which every peer computes whole")
    attentions: int = Field(ge=1, description="attention layers over the image tokens in one forward")
    kv_bytes_per_row: int = Field(ge=0, description="bytes of the image tokens' keys and values, one row, all attentions")

    def allows(self, sp: int) -> bool:
        return self.tokens % sp == 0

    @staticmethod
    def exact(full_steps_done: int, step: int, tau2: int | None) -> bool:
        """Token splits are exact on every step."""
        return True


class PatchSplit(_Strict):
    """What a UNet's feature maps exchange when ``Mesh.sp`` shard peers each run a band of the
    latent's rows (displaced patch parallelism, ``runtime.patches``), per row of one forward."""

    latent: str = Field(description="the graph input holding the latent, split into row bands")
    height: int = Field(gt=0, description="latent rows")
    factor: int = Field(ge=1, description="every band holds a multiple of this many rows (the UNet's downsampling)")
    halo_bytes_per_row: int = Field(ge=0, description="rows convolutions read from neighbour bands")
    kv_bytes_per_row: int = Field(ge=0, description="self-attention keys and values")
    stats_bytes_per_row: int = Field(ge=0, description="group-norm statistics")
    exchanges: int = Field(ge=1, description="operations that read across bands in one forward")
    #: Full steps at the start of each call computed exactly (peers' values of the same step);
    #: the first full step after the window is exact too.
    exact_steps: int = Field(default=4, ge=1)

    def allows(self, sp: int) -> bool:
        return self.height % sp == 0 and (self.height // sp) % self.factor == 0

    def exact(self, full_steps_done: int, step: int, tau2: int | None) -> bool:
        """Whether full step ``step`` exchanges this step's values between bands: the first
        ``exact_steps`` full steps of a call, and the first full step after the window (the
        peers' last values are several steps old there). The runtime and the simulator ask here."""
        return full_steps_done < self.exact_steps or (tau2 is not None and step == tau2 + 1)


class GraphInfo(_Strict):
    fingerprint: str = Field(min_length=1)
    num_nodes: int = Field(gt=0)
    latent: str = Field(default="sample", description="the graph input carrying the noisy latent")
    #: Blocks opened into their children after tracing, in order (see compiler.refine): the
    #: runtime applies the same list to reproduce this graph.
    refined: list[str] = Field(default_factory=list)
    #: Nodes that do not depend on the latent (time and added-condition embeddings): every
    #: rank recomputes them each step from its own inputs, so they are never stale.
    replicated: list[str]
    #: Set for transformer denoisers whose tokens can be split (``Mesh.sp``); None otherwise.
    tokens: TokenSplit | None = None
    #: Set for UNets whose feature maps can be split into row bands (``Mesh.sp``); None otherwise.
    patches: PatchSplit | None = None

    @property
    def shard_split(self) -> TokenSplit | PatchSplit | None:
        """How shard peers (``Mesh.sp``) split this graph's rows: tokens, bands, or not at all."""
        return self.tokens if self.tokens is not None else self.patches


def receives_next(consumer: int, output_stage: int, next_is_last: bool) -> bool:
    """Whether stage ``consumer`` reads cut tensors on the next window step. On the window's last
    step only the stage that holds the output runs, so nothing is sent to the others: a message
    no step reads would be left queued into the next pipeline call."""
    return not next_is_last or consumer == output_stage


class Mesh(_Strict):
    """How N devices are used: ``dp`` replicas x ``cfg`` branch groups x ``pp`` pipeline stages.

    A replica is ``cfg * pp`` consecutive ranks (replica d, position s is rank
    ``d * cfg * pp + s``); ranks beyond ``dp * cfg * pp`` stay idle. With ``cfg = 2`` positions
    ``0..pp-1`` serve the unconditional branch and ``pp..2pp-1`` the conditional one; with
    ``cfg = 1`` every position serves the whole CFG batch (or the only branch without guidance).

    The rows of a denoiser call (the pipeline's CFG batch, ``[uncond; cond]``) are shared out
    here, so the runtime executes and the simulator predicts the same assignment:
    outside the window a group's rows are split into contiguous chunks, one per member, and
    inside it stage ``s`` runs on ``window_rows(s)``.
    """

    world_size: int = Field(ge=1)
    dp: int = Field(ge=1, description="replicas, each generating different images")
    cfg: Literal[1, 2] = Field(description="2: one group per guidance branch; 1: groups serve both")
    pp: int = Field(ge=1, description="devices per branch group = pipeline stages per group")
    batch: int = Field(default=1, ge=1, description="images the plan was costed for")
    sp: int = Field(default=1, ge=1, description="members of a branch group splitting one row's image tokens on full steps")

    @model_validator(mode="after")
    def _fits(self) -> Mesh:
        if self.dp * self.cfg * self.pp > self.world_size:
            raise ValueError(f"mesh {self.label} needs {self.dp * self.cfg * self.pp} devices, more than world_size {self.world_size}")
        if self.members % self.sp:
            raise ValueError(f"mesh {self.label}: sp={self.sp} must divide the {self.members} members of a branch group")
        return self

    @property
    def label(self) -> str:
        return f"dp={self.dp},cfg={self.cfg},pp={self.pp}" + (f",sp={self.sp}" if self.sp > 1 else "")

    @property
    def members(self) -> int:
        """Positions of one branch group (all of a replica's when ``cfg = 1``)."""
        return self.pp if self.cfg == 2 else self.replica_size

    @property
    def replica_size(self) -> int:
        """Ranks per replica, which is also the number of pipeline stages."""
        return self.cfg * self.pp

    def check_guided(self, guided: bool) -> None:
        """A run without guidance has no branches for a cfg=2 mesh to split: one line, no hang."""
        if self.cfg == 2 and not guided:
            raise HybridiffError(
                f"the plan's mesh {self.label} splits the guidance branches but this run has no "
                "guidance (guidance_scale <= 1); use a guidance scale > 1 or compile a cfg=1 plan"
            )

    @property
    def idle_ranks(self) -> list[int]:
        return list(range(self.dp * self.replica_size, self.world_size))

    @property
    def images_per_call(self) -> int:
        """Images a replica denoises together in one pipeline call."""
        return -(-self.batch // self.dp)

    def replica_images(self, images: int) -> list[list[int]]:
        """Image indices per replica, split into the pipeline calls each replica makes:
        round-robin over replicas, ``images_per_call`` together. The runtime generates them
        so and the simulator predicts them so."""
        per_call = self.images_per_call
        mine = [list(range(d, images, self.dp)) for d in range(self.dp)]
        return [[m[i : i + per_call] for i in range(0, len(m), per_call)] for m in mine]

    def rank(self, replica: int, position: int) -> int:
        return replica * self.replica_size + position

    def replica_ranks(self, replica: int) -> tuple[int, ...]:
        return tuple(self.rank(replica, s) for s in range(self.replica_size))

    def locate(self, rank: int) -> tuple[int, int] | None:
        """(replica, position) of ``rank``, or None for an idle rank."""
        if rank >= self.dp * self.replica_size:
            return None
        return divmod(rank, self.replica_size)

    def branch_of(self, position: int) -> Branch:
        if self.cfg == 1:
            return "both"
        return "uncond" if position < self.pp else "cond"

    def group_rows(self, position: int, rows: int) -> range:
        """The rows of a call of ``rows`` that ``position``'s branch group is responsible for."""
        branch = self.branch_of(position)
        half = rows // 2
        return {"both": range(rows), "uncond": range(half), "cond": range(half, rows)}[branch]

    def computed_rows(self, position: int, rows: int) -> range:
        """The rows ``position`` works on in a fully connected step (may be empty): a group's rows
        are split into contiguous chunks, one per ``sp`` consecutive members, which split each
        row's image tokens among them (each member its ``shard_index``)."""
        group = self.group_rows(position, rows)
        chunks = self.members // self.sp
        index = position % self.members // self.sp
        size, extra = divmod(len(group), chunks)
        start = group.start + index * size + min(index, extra)
        return range(start, start + size + (index < extra))

    def shard_index(self, position: int) -> int:
        """Which ``1/sp`` of each row's image tokens ``position`` computes on a full step."""
        return position % self.members % self.sp

    def shard_peers(self, position: int) -> tuple[int, ...]:
        """The positions sharing ``position``'s rows token by token, in shard order."""
        first = position - self.shard_index(position)
        return tuple(range(first, first + self.sp))

    def shard_groups(self) -> list[tuple[int, ...]]:
        """Every row chunk's shard peers, as ranks (none unless ``sp > 1``)."""
        firsts = [s for s in range(self.replica_size) if self.shard_index(s) == 0] if self.sp > 1 else []
        return [tuple(self.rank(d, p) for p in self.shard_peers(s)) for d in range(self.dp) for s in firsts]

    def full_rows(self, position: int, rows: int) -> range:
        """The rows whose prediction and cut tensors ``position`` holds whole after a fully
        connected step: its computed rows, held by the first of their ``sp`` shard peers."""
        computed = self.computed_rows(position, rows)
        return computed if self.shard_index(position) == 0 else range(computed.start, computed.start)

    def window_rows(self, position: int, rows: int, window_guidance: str) -> range:
        """The rows stage ``position`` runs in the window: its own branch ("mixed", the paper),
        the conditional branch ("cached"), or the whole batch (cfg = 1)."""
        if self.cfg == 1:
            return range(rows)
        return self.group_rows(position if window_guidance == "mixed" else self.replica_size - 1, rows)


class Stage(_Strict):
    index: int = Field(ge=0, description="stage s runs on position s of every replica")
    nodes: list[str] = Field(min_length=1, description="heavy nodes, in topological order")
    recompute: list[str] = Field(description="replicated nodes this stage recomputes each step")
    cost_s: float = Field(ge=0, description="compute of nodes and recomputed embeddings, one row, seconds")
    send_bytes: int = Field(ge=0, description="cut tensor bytes this stage sends per window step and row")


class CutTensor(_Strict):
    """A value produced in one stage and consumed by others: sent one step stale.

    ``shape`` and ``bytes`` are for one row (one image of one branch); ``batch_dim`` is the
    dimension that grows with the rows a stage runs. Shape arithmetic crossing a cut
    (``constant`` set) is static for the plan's image size: consumers compute it from here
    (``constant + (rows - 1) * constant_per_row``) and nothing is sent.
    """

    node: str
    producer: int = Field(ge=0, description="producing stage index")
    consumers: list[int] = Field(min_length=1)
    shape: list[int]
    dtype: str
    bytes: int = Field(ge=0)
    batch_dim: int | None = 0
    constant: int | float | list[int] | None = None
    constant_per_row: int | float | list[int] | None = None

    def runtime_value(self, rows: int = 1) -> int | float | tuple[int, ...] | None:
        value, step = self.constant, self.constant_per_row
        if isinstance(value, list):
            steps = step if isinstance(step, list) else [0] * len(value)
            return tuple(v + (rows - 1) * d for v, d in zip(value, steps))
        return value if value is None or step is None else value + (rows - 1) * step

    def row_shape(self, rows: int) -> list[int]:
        """The tensor's shape when its stage runs ``rows`` rows."""
        shape = list(self.shape)
        if self.batch_dim is not None:
            shape[self.batch_dim] *= rows
        return shape


class Schedule(_Strict):
    """When to switch phases (paper Eq. 1 rule): see ``hybridiff.runtime.phases``."""

    steps: int = Field(gt=0)
    guidance_scale: float = Field(ge=0, description="> 1 enables classifier-free guidance")
    L: int = Field(ge=1, description="slope window, steps")
    g_slope: float = Field(ge=0, description="0: the rule never fires and the window starts at tau_cap (a fixed warm-up)")
    tau_cap: int = Field(ge=0, description="latest step at which the window may start")
    k: int = Field(ge=0, description="window length in steps; 0 disables the window")
    #: Inside the window: "mixed" (the paper: each stage uses its rank's branch, guidance off)
    #: or "cached" (all stages conditional, tau1's eps_c - eps_u added back: guidance kept).
    window_guidance: Literal["mixed", "cached"] = "mixed"

    @property
    def guided(self) -> bool:
        """Whether the pipeline runs classifier-free guidance (diffusers: scale > 1)."""
        return self.guidance_scale > 1

    @property
    def expected_tau1(self) -> int:
        """Where predictions put the window's start: the latest step the rule allows. Where it
        starts does not change a step's cost, only how many window steps fit."""
        return min(self.tau_cap, self.steps - 1)

    def rows(self, images: int) -> int:
        """Rows of a denoiser call for ``images`` images: both CFG branches when guided."""
        return images * (2 if self.guided else 1)

    def window_steps(self, tau1: int, steps: int | None = None) -> int:
        """How many window steps follow ``tau1`` before the last of ``steps`` (default: the
        plan's): the window never reaches past the run's last step."""
        return max(0, min(self.k, (steps or self.steps) - 1 - tau1))


class StepCosts(_Strict):
    """What a denoising step costs besides the denoiser's compute, measured on the machine
    that compiled the plan (``hybridiff.calibrate``); zero where nothing was measured.

    The cost model needs them: on short forwards they are a large part of a step, and a plan
    that leaves them out predicts a speed-up it does not deliver."""

    measured_on: str = Field(default="not measured", description="what ran to measure them")
    pipeline_s: float = Field(default=0.0, ge=0, description="the stock pipeline's own work per step: scheduler, guidance, callbacks")
    full_sync_s: float = Field(
        default=0.0,
        ge=0,
        description="per full step of a 2-device replica, besides compute: exchanging predictions, waiting "
        "for the slower peer, glue",
    )
    window_sync_s: float = Field(default=0.0, ge=0, description="per window step of a 2-device replica, besides compute")


class Estimates(_Strict):
    """Cost-model predictions (see ``hybridiff.simulate``), seconds unless named otherwise."""

    device: str
    threads: int
    link_gbps: float
    forward_s: float = Field(description="one forward of one row (one image, one branch)")
    forward_batch2_s: float = Field(description="one forward of two rows: the serial CFG step")
    #: Forwards measured at the row counts of the plan's batch (``B`` and ``2B`` rows): how
    #: compute grows with rows beyond two, which a straight line from one and two misses.
    forward_rows_s: dict[int, float] = Field(default_factory=dict)
    prediction_bytes: int = Field(ge=0, description="the denoiser output of one row")
    window_step_s: float = Field(description="one window step for one image per replica")
    window_comm_bytes_per_step: int
    comm_bytes_per_image: int = Field(description="expected bytes sent by all ranks for one image")
    expected_tau1: int
    latency_s: float = Field(description="predicted denoising time of the plan's batch")
    serial_latency_s: float = Field(description="the same batch on one device, stock pipeline")
    speedup: float
    #: Predicted latency of every mesh the compiler considered, by label.
    alternatives: dict[str, float] = Field(default_factory=dict)
    step_costs: StepCosts = Field(default_factory=StepCosts)


class Plan(_Strict):
    format_version: Literal[2] = FORMAT_VERSION
    hybridiff_version: str
    model: ModelRef
    graph: GraphInfo
    mesh: Mesh
    stages: list[Stage] = Field(min_length=1)
    cut_tensors: list[CutTensor]
    schedule: Schedule
    estimates: Estimates
    #: The peer strategy this plan reproduces (``compile --strategy``); None: the compiler's choice.
    strategy: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise ValueError("stages must be numbered 0..S-1 in order")
        if len(self.stages) != self.mesh.replica_size:
            raise ValueError(f"{len(self.stages)} stages for a mesh {self.mesh.label} of {self.mesh.replica_size} positions")
        split = self.graph.shard_split
        if self.mesh.sp > 1 and (split is None or not split.allows(self.mesh.sp)):
            raise ValueError(f"mesh {self.mesh.label} splits each image among shard peers, which this graph does not allow")
        if self.mesh.cfg == 2 and not self.schedule.guided:
            raise ValueError("a cfg=2 mesh splits the guidance branches and needs guidance_scale > 1")
        seen: set[str] = set()
        for stage in self.stages:
            dup = seen.intersection(stage.nodes)
            if dup:
                raise ValueError(f"nodes {sorted(dup)} are assigned to more than one stage")
            seen.update(stage.nodes)
        if sum("output" in s.nodes for s in self.stages) != 1:
            raise ValueError("exactly one stage must hold the node 'output'")
        for cut in self.cut_tensors:
            if cut.producer >= len(self.stages) or cut.node not in self.stages[cut.producer].nodes:
                raise ValueError(f"cut tensor {cut.node!r} is not produced by stage {cut.producer}")
            if any(c >= len(self.stages) or c == cut.producer for c in cut.consumers):
                raise ValueError(f"cut tensor {cut.node!r} has invalid consumers {cut.consumers}")
        return self

    @property
    def output_stage(self) -> int:
        """The stage whose last node is the prediction: it broadcasts each window step's output."""
        return next(s.index for s in self.stages if "output" in s.nodes)

    @property
    def imbalance(self) -> float:
        return imbalance([s.cost_s for s in self.stages])

    def links(self) -> dict[tuple[int, int], list[CutTensor]]:
        """(producing stage, consuming stage) -> the cut tensors sent along it each window step,
        in plan order (the order they travel in). Static shape arithmetic (``constant``) never
        travels: it is in the plan."""
        found: dict[tuple[int, int], list[CutTensor]] = {}
        for c in self.cut_tensors:
            if c.constant is None:
                for consumer in c.consumers:
                    found.setdefault((c.producer, consumer), []).append(c)
        return found

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON atomically (a crash never leaves half a plan)."""
        write_atomic(Path(path), self.model_dump_json(indent=2) + "\n")


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan; every problem becomes a one-line ``HybridiffError``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise HybridiffError(f"cannot read plan {path}: {e.strerror}; pass the file `hybridiff compile` wrote") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HybridiffError(f"plan {path} is not JSON ({e.msg} at line {e.lineno}); recompile it") from None
    except RecursionError:
        raise HybridiffError(f"plan {path} is nested too deeply to be a plan; recompile it") from None
    if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
        raise HybridiffError(
            f"plan {path} has format_version {data.get('format_version')!r}, this hybridiff reads "
            f"{FORMAT_VERSION}; recompile it with `hybridiff compile`"
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "plan"
        raise HybridiffError(
            f"invalid plan {path}: {where}: {first['msg']} ({e.error_count()} problem(s)); recompile it"
        ) from None
