"""A traced graph's costs, and what the simulator needs of each candidate mesh: the balanced
partitions by stage count, their cut tensors, and the layout the step programs are built from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable

from torch import fx

from hybridiff.compiler.balance import balance
from hybridiff.compiler.cost import DeviceModel, NodeMeasure, forward_time, profile_nodes
from hybridiff.compiler.emit import cut_tensors, shard_dims
from hybridiff.compiler.options import CompileOptions
from hybridiff.compiler.partition import Partition, best_partition
from hybridiff.compiler.patches import patch_split
from hybridiff.compiler.tokens import token_split
from hybridiff.graph.trace import graph_fingerprint
from hybridiff.plan import CutTensor, Execution, Mesh, ModelRef, PatchSplit, Schedule, StepCosts, TokenSplit, link_bytes_per_s
from hybridiff.program.layout import Layout
from hybridiff.simulate import Workload, forward_by_rows

#: (graph refined for the stage count, blocks opened, node measures, partition)
Split = tuple[fx.GraphModule, list[str], dict[str, NodeMeasure], Partition]


@dataclass
class CostedModel:
    """A graph's costs and what a plan says about its model, with its balanced partitions by
    stage count (made on first use): everything plans for any mesh and schedule are made from.
    ``hybridiff bench`` plans every strategy from one of these, so the model is costed once."""

    graph: fx.GraphModule
    latent: str
    branch_inputs: dict[str, Any]
    forward_s: float
    #: Whole forwards by row count, two rows (the serial CFG step) at least.
    forward_rows_s: dict[int, float]
    model: ModelRef
    link_gbps: float
    device: str
    repeats: int
    cost: str
    device_model: DeviceModel | None
    #: How the whole forwards were timed; compiled, node costs are scaled to them (``measure``).
    execution: Execution = "eager"
    #: Cores other processes kept busy when the costs were timed (``hybridiff.load``).
    background_busy_cores: float | None = None
    #: ``flops`` costs priced at this rate instead of one forward on ``branch_inputs`` (meta
    #: tensors, where that forward is too big to run: ``compiler.entries._priced_rate``).
    seconds_per_flop: float | None = None
    step_costs: StepCosts = field(default_factory=StepCosts)
    splits: dict[int, Split] = field(default_factory=dict)
    #: Node measures by graph fingerprint: partitions into different stage counts open the
    #: same blocks, and costing a graph is the slow part of planning.
    measures: dict[str, dict[str, NodeMeasure]] = field(default_factory=dict)
    _cuts: dict[tuple[int, int], list[CutTensor]] = field(default_factory=dict)

    @property
    def link_bytes_per_s(self) -> float:
        return link_bytes_per_s(self.link_gbps)

    def measure(self, gm: fx.GraphModule) -> dict[str, NodeMeasure]:
        """The measures of every node of ``gm`` (the graph or a refinement of it)."""
        key = graph_fingerprint(gm)
        if key not in self.measures:
            measures = profile_nodes(gm, self.branch_inputs, self.repeats, self.cost, self.device_model, self.seconds_per_flop)
            self.measures[key] = self._compiled_scale(measures) if self.execution == "compiled" else measures
        return self.measures[key]

    def _compiled_scale(self, measures: dict[str, NodeMeasure]) -> dict[str, NodeMeasure]:
        """Compiled, a node has no time of its own (inductor fuses it with its neighbours):
        every node's eager cost is scaled by one factor, so the nodes sum to the compiled
        one-row forward. Stages then balance by eager shares of the compiled time."""
        scale = self.forward_s / max(1e-12, sum(m.cost_s for m in measures.values()))
        return {name: replace(m, cost_s=m.cost_s * scale) for name, m in measures.items()}

    def split(self, stages: int) -> Split:
        """The balanced partition into ``stages`` (ValueError if the graph has too few blocks)."""
        if stages not in self.splits:

            def costed_split(gm: fx.GraphModule) -> tuple[dict[str, NodeMeasure], Partition]:
                measures = self.measure(gm)
                return measures, best_partition(gm, measures, stages, self.link_bytes_per_s, self.latent)

            self.splits[stages] = balance(self.graph, costed_split)
        return self.splits[stages]

    def cut_tensors(self, stages: int, sp: int = 1) -> list[CutTensor]:
        """The plan entries of the cut tensors of ``stages`` stages; with ``sp > 1`` each says
        along which dimension a shard peer holds only its share (``emit.shard_dims``)."""
        key = (stages, sp)
        if key not in self._cuts:
            graph, _, measures, partition = self.split(stages)
            if sp > 1:
                dims = shard_dims(graph, self.shard_split(sp), sp, self.branch_inputs, [c.node for c in partition.cuts])
                whole = self.cut_tensors(stages)
                self._cuts[key] = [c.model_copy(update={"shard_dim": dims.get(c.node)}) for c in whole]
            else:
                self._cuts[key] = cut_tensors(graph, self.branch_inputs, partition, measures)
        return self._cuts[key]

    def shard_split(self, sp: int) -> TokenSplit | PatchSplit | None:
        """How ``sp`` shard peers split this graph's rows (None without ``sp``)."""
        return (self.tokens or self.patches) if sp > 1 else None

    def workload(self, mesh: Mesh, schedule: Schedule) -> Workload:
        """What the simulator needs to cost ``mesh``'s step programs under ``schedule``."""
        partition = self.split(mesh.replica_size)[3]
        layout = Layout.build(
            mesh,
            schedule.window_guidance,
            self.cut_tensors(mesh.replica_size, mesh.sp),
            output_stage=next(i for i, nodes in enumerate(partition.stages) if "output" in nodes),
            prediction_bytes=partition.output_bytes,
            split=self.shard_split(mesh.sp),
        )
        return Workload(
            layout=layout,
            forward_by_rows=forward_by_rows(self.forward_s, self.forward_rows_s[2], self.forward_rows_s),
            stage_costs=partition.stage_costs,
            link_bytes_per_s=self.link_bytes_per_s,
            step_costs=self.step_costs,
            two_calls=self.model.guidance_calls == "two-calls",
        )

    @cached_property
    def tokens(self) -> TokenSplit | None:
        """The graph's image tokens, where sequence parallelism can split them."""
        return token_split(self.graph, self.branch_inputs)

    @cached_property
    def patches(self) -> PatchSplit | None:
        """What a UNet's row bands exchange, where patch parallelism can split them."""
        return None if self.tokens is not None else patch_split(self.graph, self.branch_inputs, self.latent)

    def sp_allows(self, patches: bool) -> Callable[[int], bool] | None:
        """Which ``sp`` the graph allows (UNet bands only with ``patches``), or None."""
        split = self.tokens or (self.patches if patches else None)
        return split.allows if split is not None else None


def cost_graph(
    graph: fx.GraphModule,
    options: CompileOptions,
    *,
    latent: str,
    branch_inputs: dict[str, Any],
    forward_rows_s: dict[int, float] | None,
    model: ModelRef,
    device: str,
    device_model: DeviceModel | None = None,
    seconds_per_flop: float | None = None,
) -> CostedModel:
    """Cost a traced graph given one guidance branch's inputs (one row).

    ``forward_rows_s`` holds whole forwards timed together by row count, two rows (the serial
    CFG step) at least; without it (custom models) the estimate assumes that rows cost in
    proportion. Without one row in it, one row is timed here. ``seconds_per_flop``: what
    ``flops`` costs are priced at, where they are not measured on these inputs (too big to run)."""
    if forward_rows_s and 1 in forward_rows_s:
        forward = forward_rows_s[1]
    elif options.cost == "roofline":
        forward = sum(m.cost_s for m in profile_nodes(graph, branch_inputs, 1, options.cost, device_model).values())
    else:
        forward = forward_time(graph, branch_inputs, options.repeats, options.execution)
    return CostedModel(
        graph, latent, branch_inputs, forward, forward_rows_s or {2: 2 * forward},
        model, options.link_gbps, device, options.repeats, options.cost, device_model, options.execution,
        seconds_per_flop=seconds_per_flop,
    )
