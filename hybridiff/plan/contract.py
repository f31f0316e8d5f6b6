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

from pydantic import Field, ValidationError, model_validator

from hybridiff.errors import HybridiffError
from hybridiff.files import write_atomic
from hybridiff.plan.estimates import Estimates
from hybridiff.plan.graph import CutTensor, GraphInfo, ModelRef, Stage
from hybridiff.plan.mesh import Mesh
from hybridiff.plan.schedule import Schedule
from hybridiff.plan.strict import Strict

#: How the runtime runs a plan's programs: one Python-dispatched kernel after another, or
#: through ``torch.compile`` (``hybridiff.graph.compiled``).
Execution = Literal["eager", "compiled"]

#: 3: cut tensors record the dimension shard peers split (``CutTensor.shard_dim``).
FORMAT_VERSION = 3


def links_of(cut_tensors: Sequence[CutTensor]) -> dict[tuple[int, int], list[CutTensor]]:
    """(producing stage, consuming stage) -> the cut tensors sent along it each window step,
    in plan order (the order they travel in). Static shape arithmetic (``constant``) never
    travels: it is in the plan."""
    found: dict[tuple[int, int], list[CutTensor]] = {}
    for c in cut_tensors:
        if c.constant is None:
            for consumer in c.consumers:
                found.setdefault((c.producer, consumer), []).append(c)
    return found


def imbalance(stage_costs: Sequence[float]) -> float:
    """Slowest stage compute over mean stage compute (1.0 is perfect balance)."""
    return max(stage_costs) / (sum(stage_costs) / len(stage_costs))


class Plan(Strict):
    format_version: Literal[3] = FORMAT_VERSION
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
    #: How the programs whose costs the estimates hold ran when they were timed, and how the
    #: runtime runs them unless told otherwise (``run --execution``).
    execution: Execution = "eager"

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise ValueError("stages must be numbered 0..S-1 in order")
        if len(self.stages) != self.mesh.replica_size:
            raise ValueError(f"{len(self.stages)} stages for a mesh {self.mesh.label} of {self.mesh.replica_size} positions")
        if self.schedule.k and len(self.stages) == 1:
            raise ValueError(
                f"schedule.k is {self.schedule.k} but mesh {self.mesh.label} runs one stage per replica, which has no window; set k to 0"
            )
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
        return links_of(self.cut_tensors)

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
