"""The execution plan: the one contract between the compiler and the runtime.

The compiler decides everything here (which rank serves which guidance branch, which graph
nodes each stage owns, which tensors cross stages, the phase-switching schedule) and the
runtime validates and executes it without re-deciding. Plans are plain JSON so they can be
inspected, diffed, stored next to a model and shipped to every node of a cluster.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hybridiff.errors import HybridiffError

FORMAT_VERSION = 1

Branch = Literal["uncond", "cond"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """What the plan was compiled from: ``builtin:NAME``, a local diffusers folder,
    ``arch:NAME`` (a published architecture, no weights) or ``python:CLASS`` (the Python API)."""

    source: str
    denoiser: Literal["unet", "sd3-transformer", "custom"] = "unet"
    height: int | None = Field(default=None, gt=0, description="image height in pixels the plan was costed for")
    width: int | None = Field(default=None, gt=0)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


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


class RankRole(_Strict):
    rank: int = Field(ge=0)
    branch: Branch


class Mesh(_Strict):
    """Which rank serves which classifier-free-guidance branch (rank 0 uncond, rank 1 cond)."""

    world_size: int = Field(ge=1)
    ranks: list[RankRole]

    @model_validator(mode="after")
    def _ranks_cover_world(self) -> Mesh:
        if sorted(r.rank for r in self.ranks) != list(range(self.world_size)):
            raise ValueError(f"mesh.ranks must list ranks 0..{self.world_size - 1} once each")
        return self

    def branch_of(self, rank: int) -> Branch:
        return next(r.branch for r in self.ranks if r.rank == rank)


class Stage(_Strict):
    index: int = Field(ge=0)
    rank: int = Field(ge=0, description="the rank that owns this stage inside the pipeline window")
    nodes: list[str] = Field(min_length=1, description="heavy nodes, in topological order")
    recompute: list[str] = Field(description="replicated nodes this stage recomputes each step")
    cost_s: float = Field(ge=0, description="compute of nodes and recomputed embeddings, batch 1, seconds")
    send_bytes: int = Field(ge=0, description="cut tensor bytes this stage sends per window step")


class CutTensor(_Strict):
    """A value produced in one stage and consumed by others: sent one step stale.

    Shape arithmetic crossing a cut (``constant`` set) is static for the plan's input shapes:
    consumers read it from here and nothing is sent.
    """

    node: str
    producer: int = Field(ge=0, description="producing stage index")
    consumers: list[int] = Field(min_length=1)
    shape: list[int]
    dtype: str
    bytes: int = Field(ge=0)
    constant: int | float | list[int] | None = None

    @property
    def runtime_value(self) -> int | float | tuple[int, ...] | None:
        return tuple(self.constant) if isinstance(self.constant, list) else self.constant


class Schedule(_Strict):
    """When to switch phases (paper Eq. 1 rule): see ``hybridiff.runtime.phases``."""

    steps: int = Field(gt=0)
    guidance_scale: float = Field(gt=1.0, description="hybrid plans need classifier-free guidance")
    L: int = Field(ge=1, description="slope window, steps")
    g_slope: float = Field(gt=0)
    tau_cap: int = Field(ge=1, description="latest step at which the window may start")
    k: int = Field(ge=0, description="window length in steps; 0 disables the window")
    #: Inside the window: "mixed" (the paper: each stage uses its rank's branch, guidance off)
    #: or "cached" (all stages conditional, tau1's eps_c - eps_u added back: guidance kept).
    window_guidance: Literal["mixed", "cached"] = "mixed"


class Estimates(_Strict):
    """Cost-model predictions, seconds per denoising step unless named otherwise."""

    device: str
    threads: int
    link_gbps: float
    serial_step_s: float = Field(description="one batch-2 (both branches) forward on one device")
    branch_step_s: float = Field(description="one batch-1 forward plus the prediction exchange")
    window_step_s: float = Field(description="max over ranks of stage compute + transfers")
    window_comm_bytes_per_step: int
    comm_bytes_per_image: int = Field(description="expected bytes sent by all ranks for one image")
    expected_tau1: int
    speedup_bound: float


class Plan(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    hybridiff_version: str
    model: ModelRef
    graph: GraphInfo
    mesh: Mesh
    stages: list[Stage] = Field(min_length=1)
    cut_tensors: list[CutTensor]
    schedule: Schedule
    estimates: Estimates

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise ValueError("stages must be numbered 0..S-1 in order")
        if len(self.stages) != self.mesh.world_size:
            raise ValueError(f"{len(self.stages)} stages for a mesh of {self.mesh.world_size} ranks")
        if sorted(s.rank for s in self.stages) != list(range(self.mesh.world_size)):
            raise ValueError("each rank must own exactly one stage")
        seen: set[str] = set()
        for stage in self.stages:
            dup = seen.intersection(stage.nodes)
            if dup:
                raise ValueError(f"nodes {sorted(dup)} are assigned to more than one stage")
            seen.update(stage.nodes)
        for cut in self.cut_tensors:
            if cut.producer >= len(self.stages) or cut.node not in self.stages[cut.producer].nodes:
                raise ValueError(f"cut tensor {cut.node!r} is not produced by stage {cut.producer}")
            if any(c >= len(self.stages) or c == cut.producer for c in cut.consumers):
                raise ValueError(f"cut tensor {cut.node!r} has invalid consumers {cut.consumers}")
        return self

    def stage_of_rank(self, rank: int) -> Stage:
        return next(s for s in self.stages if s.rank == rank)

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


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
