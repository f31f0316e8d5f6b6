"""Run any subset of a traced graph's nodes: a whole forward, one stage, or one node.

The compiler uses this to time nodes and to check that chained stages equal the model; the
runtime uses it to execute stages. Values live in an explicit environment keyed by node name,
so a stage can be fed values that another device (or an earlier step) produced. Intermediate
values are dropped after their last use inside the program, as a plain forward would, except
those the caller asks to keep (the tensors a stage must send on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import fx


@dataclass(frozen=True)
class NodeProgram:
    """An ordered list of nodes to run and when each intermediate value can be freed."""

    nodes: tuple[fx.Node, ...]
    keep: frozenset[str]
    free_after: dict[fx.Node, tuple[fx.Node, ...]] = field(default_factory=dict)


class GraphRunner:
    """Executes node subsets of one ``fx.GraphModule``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: dict[str, fx.Node] = {n.name: n for n in gm.graph.nodes}
        self.order: dict[str, int] = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self._interp = fx.Interpreter(gm, garbage_collect_values=False)

    def program(self, names: Iterable[str], keep: Iterable[str] = ()) -> NodeProgram:
        """A program running ``names`` (any order given; run topologically)."""
        nodes = tuple(sorted((self.nodes[n] for n in set(names)), key=lambda n: self.order[n.name]))
        keep = frozenset(keep) | {self.output.name}
        inside = set(nodes)
        last_use: dict[fx.Node, fx.Node] = {}
        for node in nodes:
            for producer in node.all_input_nodes:
                if producer in inside:
                    last_use[producer] = node
        free_after: dict[fx.Node, list[fx.Node]] = {}
        for producer, user in last_use.items():
            if producer.name not in keep:
                free_after.setdefault(user, []).append(producer)
        return NodeProgram(nodes, keep, {k: tuple(v) for k, v in free_after.items()})

    def run(self, program: NodeProgram, env: dict[str, Any]) -> dict[str, Any]:
        """Run ``program`` on values in ``env`` (graph inputs and received values by name).

        Returns the kept values by node name (the graph output under ``"output"``).
        """
        values: dict[fx.Node, Any] = {}
        for name, value in env.items():
            values[self.nodes[name]] = value
        for ph in self.placeholders:
            if ph not in values:
                values[ph] = ph.args[0] if ph.args else None
        interp = self._interp
        interp.env = values
        for node in program.nodes:
            values[node] = interp.run_node(node)
            for dead in program.free_after.get(node, ()):
                del values[dead]
        interp.env = {}
        return {n.name: v for n, v in values.items() if n.name in program.keep and n in program.nodes}
