"""Cut the traced graph into pipeline stages that minimise the window step time.

Inside the pipeline window every rank runs its own stage at once, so a window step costs the
slowest rank's compute plus what it must send, plus the broadcast of the final prediction.
Nodes that do not depend on the latent (time and added-condition embeddings) are cheap and are
recomputed by every stage that needs them, so they never cross a cut and are never stale.

Stages here are contiguous ranges of the heavy nodes in topological order, found by dynamic
programming over every valid boundary; a boundary is valid only when everything crossing it is
a tensor (a block's tuple output stays with the block and its ``getitem`` users).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
from torch import fx

from hybridiff.compiler.cost import NodeMeasure
from hybridiff.compiler.trace import LATENT_INPUT


@dataclass(frozen=True)
class CutValue:
    node: str
    producer: int
    consumers: tuple[int, ...]
    bytes: int
    #: Set for shape arithmetic (ints): consumers take it from the plan, nothing is sent.
    constant: int | float | tuple[int, ...] | None = None


@dataclass(frozen=True)
class Partition:
    replicated: tuple[str, ...]
    #: Heavy nodes per stage in topological order; the last stage also runs the graph output.
    stages: tuple[tuple[str, ...], ...]
    #: Compute seconds per stage (its nodes and the embeddings it recomputes) and bytes it sends.
    stage_costs: tuple[float, ...]
    stage_sent_bytes: tuple[int, ...]
    cuts: tuple[CutValue, ...]
    output_bytes: int
    window_step_s: float
    window_comm_bytes_per_step: int


def dependency_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's data dependencies as a networkx DAG over node names."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op)
        for producer in node.all_input_nodes:
            g.add_edge(producer.name, node.name)
    return g


_METADATA_ATTRS = {"shape", "dtype", "device", "ndim"}
_METADATA_METHODS = {"size", "dim"}


def _reads_input_metadata(node: fx.Node) -> bool:
    """``x.shape``/``x.size()``-style access to a graph input: known to every rank."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or source.op != "placeholder":
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def classify(gm: fx.GraphModule, latent: str = LATENT_INPUT) -> tuple[list[str], list[str]]:
    """Split compute nodes into (replicated, heavy) lists in topological order.

    Heavy nodes depend on the latent's values; the rest (embeddings of the timestep and
    conditions, and arithmetic on the inputs' shapes) are cheap and recomputed by every stage.
    """
    on_latent: set[str] = set()
    replicated, heavy = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name == latent:
                on_latent.add(node.name)
            continue
        if node.op == "output":
            continue
        if not _reads_input_metadata(node) and any(p.name in on_latent for p in node.all_input_nodes):
            on_latent.add(node.name)
            heavy.append(node.name)
        else:
            replicated.append(node.name)
    if latent not in {n.name for n in gm.graph.nodes if n.op == "placeholder"}:
        raise ValueError(f"graph has no input named {latent!r}")
    return replicated, heavy


def replicated_needed(g: nx.DiGraph, replicated: set[str], nodes: set[str]) -> set[str]:
    """The replicated nodes a set of heavy nodes depends on."""
    needed: set[str] = set()
    for name in nodes:
        needed |= nx.ancestors(g, name) & replicated
    return needed


def split_contiguous(
    gm: fx.GraphModule,
    measures: dict[str, NodeMeasure],
    num_stages: int,
    link_bytes_per_s: float,
    latent: str = LATENT_INPUT,
) -> Partition:
    """The contiguous split into ``num_stages`` stages with the least window step time."""
    g = dependency_graph(gm)
    replicated, heavy = classify(gm, latent)
    rep_set = set(replicated)
    n = len(heavy)
    if n < num_stages:
        raise ValueError(f"graph has {n} heavy nodes, too few for {num_stages} stages")
    position = {name: i for i, name in enumerate(heavy)}
    output_name = next(node.name for node in gm.graph.nodes if node.op == "output")
    # The furthest heavy position that consumes each heavy value (the output counts as last).
    last_user = {name: max((position.get(u, n) for u in g.successors(name)), default=-1) for name in heavy}
    rep_ancestors = {name: nx.ancestors(g, name) & rep_set for name in heavy}
    output_value = next(p for p in g.predecessors(output_name))
    output_bytes = measures[output_value].bytes

    def crossable(name: str) -> bool:
        return measures[name].shape is not None or measures[name].constant is not None

    def boundary_ok(i: int) -> bool:
        """Whether every value crossing the boundary before position i is a tensor or constant."""
        return all(crossable(heavy[j]) for j in range(i) if last_user[heavy[j]] >= i)

    bounds = [0, *(i for i in range(1, n) if boundary_ok(i)), n]
    rep_names = sorted(rep_set)
    rep_bit = {r: 1 << k for k, r in enumerate(rep_names)}
    rep_mask = [sum(rep_bit[r] for r in rep_ancestors[x]) for x in heavy]
    rep_cost = [measures[r].cost_s for r in rep_names]
    leaving: dict[int, list[int]] = {}
    for x, name in enumerate(heavy):
        leaving.setdefault(last_user[name], []).append(x)

    def mask_cost(mask: int) -> float:
        return sum(c for k, c in enumerate(rep_cost) if mask >> k & 1)

    # cost[(a, b)] = (compute seconds, bytes sent) of a stage owning heavy[a:b], for valid a < b.
    # One sweep per start keeps the sums incremental.
    cost: dict[tuple[int, int], tuple[float, int]] = {}
    valid = set(bounds)
    for a in bounds[:-1]:
        compute, mask, sent = 0.0, 0, 0
        for b in range(a + 1, n + 1):
            x = b - 1
            compute += measures[heavy[x]].cost_s
            mask |= rep_mask[x]
            if b <= last_user[heavy[x]] < n:
                sent += measures[heavy[x]].bytes
            sent -= sum(measures[heavy[y]].bytes for y in leaving.get(x, ()) if a <= y < x)
            if b in valid:
                cost[(a, b)] = (compute + mask_cost(mask), sent)

    def step(a: int, b: int) -> float:
        compute, sent = cost[(a, b)]
        return compute + sent / link_bytes_per_s

    # best[s][b] = (slowest step of s stages covering heavy[:b], their end boundaries)
    best: list[dict[int, tuple[float, tuple[int, ...]]]] = [{0: (0.0, ())}]
    for s in range(1, num_stages + 1):
        layer: dict[int, tuple[float, tuple[int, ...]]] = {}
        for b in bounds:
            if b == 0 or (s == num_stages and b != n):
                continue
            for a, (prev, ends) in best[s - 1].items():
                if a < b:
                    slowest = max(prev, step(a, b))
                    if b not in layer or slowest < layer[b][0]:
                        layer[b] = (slowest, ends + (b,))
        best.append(layer)
    if n not in best[num_stages]:
        raise ValueError(f"no valid boundaries for {num_stages} stages")
    slowest, ends = best[num_stages][n]
    starts = (0, *ends[:-1])
    stages = tuple(tuple(heavy[a:b]) for a, b in zip(starts, ends))
    stage_of = {name: s for s, nodes in enumerate(stages) for name in nodes}
    cuts = []
    for name in heavy:
        consumers = sorted({stage_of[u] for u in g.successors(name) if u in stage_of} - {stage_of[name]})
        if consumers:
            m = measures[name]
            cuts.append(CutValue(name, stage_of[name], tuple(consumers), m.bytes, m.constant))
    broadcast = output_bytes * (num_stages - 1)
    return Partition(
        replicated=tuple(replicated),
        stages=stages[:-1] + (stages[-1] + (output_name,),),
        stage_costs=tuple(cost[(a, b)][0] for a, b in zip(starts, ends)),
        stage_sent_bytes=tuple(cost[(a, b)][1] for a, b in zip(starts, ends)),
        cuts=tuple(cuts),
        output_bytes=output_bytes,
        window_step_s=slowest + broadcast / link_bytes_per_s,
        window_comm_bytes_per_step=sum(c.bytes * len(c.consumers) for c in cuts) + broadcast,
    )
