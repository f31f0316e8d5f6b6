"""Writing the plan down: the chosen mesh's stages, cut tensors and estimates.

Cut tensors need two measurements besides a forward's shapes: how each grows with rows (a
two-row forward) and, for shard peers (``Mesh.sp``), along which dimension a peer holds only
its share after a full step (one peer's forward, its peers mirrored). The runtime reads both
from the plan instead of guessing from shapes, and the simulator charges what they imply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

import hybridiff
from hybridiff.compiler.cost import NodeMeasure
from hybridiff.compiler.partition import CutValue, Partition, dependency_graph, replicated_needed
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.rows import repeat_rows
from hybridiff.graph.trace import graph_fingerprint
from hybridiff.plan import CutTensor, Estimates, GraphInfo, Mesh, PatchSplit, Phase, Plan, Schedule, Stage, TokenSplit
from hybridiff.program.build import ProgramBuilder
from hybridiff.runtime.execution.patches import PatchShards
from hybridiff.runtime.execution.sequence import TokenShards
from hybridiff.simulate import Workload, serial_latency, simulate, step_seconds

if TYPE_CHECKING:
    from hybridiff.compiler.costing import CostedModel


def assemble(costed: CostedModel, chosen: Mesh, work: Workload, alternatives: dict[str, float], *, schedule: Schedule) -> Plan:
    """The plan for ``chosen`` (``work``: its workload), with its estimates."""
    graph, refined, _, partition = costed.split(chosen.replica_size)
    latency = simulate(chosen, work, schedule, chosen.batch).latency_s
    one = simulate(chosen.model_copy(update={"batch": 1}), work, schedule, 1)
    # One mid-window step of one image: its time and the bytes it moves, from its program.
    window = ProgramBuilder(work.layout).window_step(schedule.rows(1))
    serial = serial_latency(work, schedule, chosen.batch)
    estimates = Estimates(
        device=costed.device,
        threads=torch.get_num_threads(),
        link_gbps=costed.link_gbps,
        forward_s=costed.forward_s,
        forward_batch2_s=costed.forward_rows_s[2],
        forward_rows_s={r: t for r, t in costed.forward_rows_s.items() if r > 2},
        prediction_bytes=partition.output_bytes,
        window_step_s=step_seconds(work, window),
        window_comm_bytes_per_step=window.bytes_by_phase()[Phase.WINDOW],
        comm_bytes_per_image=one.comm_bytes,
        expected_tau1=schedule.expected_tau1,
        latency_s=latency,
        serial_latency_s=serial,
        speedup=serial / latency,
        alternatives=alternatives or {chosen.label: latency},
        step_costs=work.step_costs,
        background_busy_cores=costed.background_busy_cores,
    )
    return Plan(
        hybridiff_version=hybridiff.__version__,
        model=costed.model,
        graph=GraphInfo(
            fingerprint=graph_fingerprint(graph),
            num_nodes=len(graph.graph.nodes),
            latent=costed.latent,
            refined=refined,
            replicated=list(partition.replicated),
            tokens=_tokens_in(graph, costed.tokens),
            patches=costed.patches if chosen.sp > 1 and costed.tokens is None else None,
        ),
        mesh=chosen,
        stages=_stages(graph, partition),
        cut_tensors=costed.cut_tensors(chosen.replica_size, chosen.sp),
        schedule=schedule,
        estimates=estimates,
        execution=costed.execution,
    )


def cut_tensors(graph: fx.GraphModule, one_row: dict[str, Any], partition: Partition, measures: dict[str, NodeMeasure]) -> list[CutTensor]:
    """The plan entries of ``partition``'s cut tensors, from one-row measures and a two-row forward."""
    doubled = _two_row_values(graph, one_row, [c.node for c in partition.cuts])
    return [_cut_tensor(c, measures[c.node], doubled.get(c.node)) for c in partition.cuts]


def shard_dims(graph: fx.GraphModule, split: TokenSplit | PatchSplit, sp: int, one_row: dict[str, Any], names: list[str]) -> dict[str, int]:
    """For each of ``names`` that one of ``sp`` shard peers holds only a share of after a full
    step: the dimension it is split along. Shard 0's forward runs with every gather answered by
    its own value (``sp`` copies), which gives each value the shape a peer holds."""
    runner = GraphRunner(graph)
    whole_program = runner.program([n.name for n in graph.graph.nodes if n.op != "placeholder"], keep=names)
    if isinstance(split, TokenSplit):
        shards: Any = TokenShards(runner, split, sp, names)
    else:
        shards = PatchShards(runner, split, sp, names)

    def mirror(tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor] * sp

    with torch.inference_mode():
        whole = runner.run(whole_program, one_row)
        part = shards.run(one_row, 0, mirror, mirror, True, {})
    dims = {}
    for name in names:
        a, b = whole.get(name), part.get(name)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim():
            differ = [d for d, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
            if len(differ) == 1 and b.shape[differ[0]] == split.share(a.shape[differ[0]], sp):
                dims[name] = differ[0]
    return dims


def _tokens_in(graph: fx.GraphModule, tokens: TokenSplit | None) -> TokenSplit | None:
    """The model's token split, where the (refined) graph kept its two nodes."""
    names = {n.name for n in graph.graph.nodes}
    needed = {tokens.shard_after, tokens.gather_after, *(t.node for t in tokens.tables)} if tokens else set()
    return tokens if tokens and needed <= names else None


def _two_row_values(graph: fx.GraphModule, one_row: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The values of ``names`` when the graph runs two rows: shows how each grows with rows.

    Empty when the graph cannot run two rows (torch.export graphs are specialised to their
    example shapes): the plan then records no batch dimension and runs one row per stage."""
    two = repeat_rows(one_row, 2)
    runner = GraphRunner(graph)
    program = runner.program([n.name for n in graph.graph.nodes if n.op != "placeholder"], keep=names)
    try:
        with torch.inference_mode():
            return runner.run(program, two)
    except Exception:  # noqa: BLE001 - any failure means the same: rows cannot grow
        return {}


def _cut_tensor(cut: CutValue, one: NodeMeasure, two: Any) -> CutTensor:
    """A plan entry for ``cut`` from its one-row measure and its two-row value (None: unknown)."""
    batch_dim = per_row = None
    if isinstance(two, torch.Tensor):
        grown = [d for d, (a, b) in enumerate(zip(one.shape or (), two.shape)) if a != b]
        if len(grown) == 1 and two.shape[grown[0]] == 2 * one.shape[grown[0]]:
            batch_dim = grown[0]
    elif cut.constant is not None and two is not None and two != cut.constant:
        if isinstance(two, tuple) and isinstance(cut.constant, tuple) and len(two) == len(cut.constant):
            per_row = [b - a for a, b in zip(cut.constant, two)]
        elif isinstance(two, (int, float)):
            per_row = two - cut.constant
    return CutTensor(
        node=cut.node,
        producer=cut.producer,
        consumers=list(cut.consumers),
        shape=list(one.shape or ()),
        dtype=one.dtype or "constant",
        bytes=cut.bytes,
        batch_dim=batch_dim,
        constant=list(cut.constant) if isinstance(cut.constant, tuple) else cut.constant,
        constant_per_row=per_row,
    )


def _stages(gm: fx.GraphModule, partition: Partition) -> list[Stage]:
    g = dependency_graph(gm)
    rep = set(partition.replicated)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stages = []
    for index, (nodes, cost, sent) in enumerate(zip(partition.stages, partition.stage_costs, partition.stage_sent_bytes)):
        recompute = sorted(replicated_needed(g, rep, set(nodes)), key=order.__getitem__)
        stages.append(Stage(index=index, nodes=list(nodes), recompute=recompute, cost_s=cost, send_bytes=sent))
    return stages
