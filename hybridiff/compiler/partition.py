"""Cut the traced graph into pipeline stages that minimise the window step time.

Inside the pipeline window every rank runs its own stage at once, so a window step costs the
slowest rank's compute plus what it must send, plus the broadcast of the final prediction.
Nodes that do not depend on the latent (time and added-condition embeddings) are cheap and are
recomputed by every stage that needs them, so they never cross a cut and are never stale.

Two shapes of partition are searched over the heavy nodes in topological order, cut only at
valid boundaries (everything crossing is a tensor or static shape arithmetic; a block's tuple
output stays with its ``getitem`` users):

- contiguous: S consecutive ranges, by dynamic programming over the boundaries;
- folded (2 stages): the head and the tail of the forward on one rank, the middle on the
  other. A UNet's long skips then stay on one device instead of crossing the link.

``best_partition`` takes the folded split when it gives a shorter window step without moving
more bytes than the best contiguous one.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import networkx as nx
import numpy as np
from torch import fx

from hybridiff.compiler.cost import NodeMeasure
from hybridiff.graph.trace import LATENT_INPUT


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
    #: One window step of ONE row: what the partition search compares. The plan's estimates
    #: take the simulator's step at the rows a call really has (``simulate.window_step``).
    window_step_s: float
    row_bytes_per_window_step: int


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


class _Chain:
    """The heavy nodes in topological order with what every search needs precomputed."""

    def __init__(self, gm: fx.GraphModule, measures: dict[str, NodeMeasure], latent: str) -> None:
        self.g = g = dependency_graph(gm)
        self.measures = measures
        self.replicated, self.heavy = classify(gm, latent)
        heavy, n = self.heavy, len(self.heavy)
        self.n = n
        position = {name: i for i, name in enumerate(heavy)}
        self.output = next(node.name for node in gm.graph.nodes if node.op == "output")
        self.output_bytes = measures[next(iter(g.predecessors(self.output)))].bytes
        #: Heavy positions of each node's users, sorted (the graph output counts as n).
        self.users = [sorted(position.get(u, n) for u in g.successors(name)) for name in heavy]
        self.last_user = [u[-1] if u else -1 for u in self.users]
        self.cost = [measures[name].cost_s for name in heavy]
        self.bytes = [measures[name].bytes for name in heavy]
        self.prefix = np.concatenate([[0.0], np.cumsum(self.cost)])
        rep = set(self.replicated)
        self.rep_ancestors = [nx.ancestors(g, name) & rep for name in heavy]
        crossable = [measures[x].shape is not None or measures[x].constant is not None for x in heavy]
        self.bounds = [0] + [
            i for i in range(1, n) if all(crossable[j] for j in range(i) if self.last_user[j] >= i)
        ] + [n]

    def recompute_cost(self, nodes: list[int]) -> float:
        reps = set().union(*(self.rep_ancestors[x] for x in nodes)) if nodes else set()
        return sum(self.measures[r].cost_s for r in reps)

    def contiguous(self, num_stages: int, link_bytes_per_s: float) -> list[list[int]]:
        """The contiguous split with the least slowest-stage step (compute + sends)."""
        n, valid = self.n, set(self.bounds)
        leaving: dict[int, list[int]] = {}
        for x in range(n):
            leaving.setdefault(self.last_user[x], []).append(x)
        rep_all = self.recompute_cost(list(range(n)))
        step: dict[tuple[int, int], float] = {}
        for a in self.bounds[:-1]:  # one incremental sweep per start
            sent = 0
            for b in range(a + 1, n + 1):
                x = b - 1
                if b <= self.last_user[x] < n:
                    sent += self.bytes[x]
                sent -= sum(self.bytes[y] for y in leaving.get(x, ()) if a <= y < x)
                if b in valid:
                    step[(a, b)] = self.prefix[b] - self.prefix[a] + rep_all + sent / link_bytes_per_s
        # best[s][b] = (slowest step of s stages covering heavy[:b], their end boundaries)
        best: list[dict[int, tuple[float, tuple[int, ...]]]] = [{0: (0.0, ())}]
        for s in range(1, num_stages + 1):
            layer: dict[int, tuple[float, tuple[int, ...]]] = {}
            for b in self.bounds:
                if b == 0 or (s == num_stages and b != n):
                    continue
                for a, (prev, ends) in best[s - 1].items():
                    if a < b:
                        slowest = max(prev, step[(a, b)])
                        if b not in layer or slowest < layer[b][0]:
                            layer[b] = (slowest, ends + (b,))
            best.append(layer)
        if n not in best[num_stages]:
            raise ValueError(f"no valid boundaries for {num_stages} stages")
        ends = best[num_stages][n][1]
        return [list(range(a, b)) for a, b in zip((0, *ends[:-1]), ends)]

    def folded(self, link_bytes_per_s: float, max_bytes: float) -> list[list[int]] | None:
        """Two stages: head + tail on the first, the middle on the second, sending at most
        ``max_bytes`` per step; None if no such split exists."""
        n, best = self.n, None
        inner = [b for b in self.bounds if 0 < b < n]
        for a in inner:
            # head values (x < a): first user at or after a decides whether the middle needs them
            first_after = np.array([self.users[x][bisect_left(self.users[x], a)] if self.last_user[x] >= a else n + 1
                                    for x in range(a)])
            order = np.argsort(first_after, kind="stable")
            head_sorted, head_cum = first_after[order], np.concatenate([[0], np.cumsum(np.array(self.bytes[:a])[order])])
            middle_sent = 0
            for c in range(a + 1, n):
                x = c - 1  # middle grows to [a, c)
                middle_sent += self.bytes[x] if self.last_user[x] >= c else 0
                middle_sent -= sum(self.bytes[y] for y in range(a, x) if self.last_user[y] == x)
                if c not in inner:
                    continue
                head_sent = head_cum[np.searchsorted(head_sorted, c, side="left")]
                if head_sent + middle_sent > max_bytes:
                    continue
                outer = self.prefix[a] + self.prefix[n] - self.prefix[c] + head_sent / link_bytes_per_s
                middle = self.prefix[c] - self.prefix[a] + middle_sent / link_bytes_per_s
                slowest = max(outer, middle)
                if best is None or slowest < best[0]:
                    best = (slowest, a, c)
        if best is None:
            return None
        _, a, c = best
        return [list(range(a)) + list(range(c, n)), list(range(a, c))]

    def assemble(self, stages: list[list[int]], link_bytes_per_s: float) -> Partition:
        """The exact costs, cuts and traffic of an assignment of heavy positions to stages."""
        stage_of = {x: s for s, xs in enumerate(stages) for x in xs}
        owner_of_output = stage_of[self.n - 1]
        cuts, sent = [], [0] * len(stages)
        for x, name in enumerate(self.heavy):
            consumers = sorted({stage_of[u] for u in self.users[x] if u < self.n} - {stage_of[x]})
            if consumers:
                m = self.measures[name]
                cuts.append(CutValue(name, stage_of[x], tuple(consumers), m.bytes, m.constant))
                sent[stage_of[x]] += m.bytes * len(consumers)
        costs = [sum(self.cost[x] for x in xs) + self.recompute_cost(xs) for xs in stages]
        broadcast = self.output_bytes * (len(stages) - 1)
        names = [tuple(self.heavy[x] for x in xs) for xs in stages]
        names[owner_of_output] += (self.output,)
        return Partition(
            replicated=tuple(self.replicated),
            stages=tuple(names),
            stage_costs=tuple(costs),
            stage_sent_bytes=tuple(sent),
            cuts=tuple(cuts),
            output_bytes=self.output_bytes,
            window_step_s=max(c + b / link_bytes_per_s for c, b in zip(costs, sent)) + broadcast / link_bytes_per_s,
            row_bytes_per_window_step=sum(sent) + broadcast,
        )


def best_partition(
    gm: fx.GraphModule,
    measures: dict[str, NodeMeasure],
    num_stages: int,
    link_bytes_per_s: float,
    latent: str = LATENT_INPUT,
) -> Partition:
    """The partition into ``num_stages`` stages with the least window step time."""
    chain = _Chain(gm, measures, latent)
    if chain.n < num_stages:
        raise ValueError(f"graph has {chain.n} heavy nodes, too few for {num_stages} stages")
    best = chain.assemble(chain.contiguous(num_stages, link_bytes_per_s), link_bytes_per_s)
    if num_stages == 2:
        # Folding must win on time without moving more bytes (links are often shared).
        folded = chain.folded(link_bytes_per_s, max_bytes=sum(best.stage_sent_bytes))
        if folded is not None:
            candidate = chain.assemble(folded, link_bytes_per_s)
            if candidate.window_step_s < best.window_step_s:
                best = candidate
    return best
