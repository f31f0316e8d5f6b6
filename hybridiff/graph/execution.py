"""Run any subset of a traced graph's nodes: a whole forward, one stage, or one node.

The compiler uses this to time nodes and to check that chained stages equal the model; the
runtime uses it to execute stages. Values live in an explicit environment keyed by node name,
so a stage can be fed values that another device (or an earlier step) produced.

A program is compiled once into its own small ``fx.GraphModule``: straight-line Python that
reads the values it needs from outside by name and returns the values the caller keeps (the
tensors a stage must send on, and the graph output). Generated code frees each intermediate
after its last use, as a plain forward would, and costs a fraction of ``fx.Interpreter``'s
per-node dispatch, which matters on short forwards run every step. With ``execution="compiled"``
each program is also put through ``torch.compile`` (``graph.compiled``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx

from hybridiff.graph.compiled import compile_callable


@dataclass(frozen=True)
class NodeProgram:
    """An ordered list of nodes, compiled into a module that runs exactly them."""

    nodes: tuple[fx.Node, ...]
    keep: frozenset[str]
    #: Values the program reads without computing them: graph inputs or other nodes' values.
    inputs: tuple[fx.Node, ...]
    module: fx.GraphModule
    #: What runs: ``module`` itself, or ``module`` under ``torch.compile``.
    call: Callable[..., Any]


class GraphRunner:
    """Executes node subsets of one ``fx.GraphModule``."""

    def __init__(self, gm: fx.GraphModule, execution: str = "eager", device: torch.device | None = None) -> None:
        """``execution``: how programs run, ``"eager"`` or ``"compiled"`` (the plan's
        ``Execution``); ``device``: where, for the compiled mode's choice."""
        self.gm, self.execution, self.device = gm, execution, device
        self.nodes: dict[str, fx.Node] = {n.name: n for n in gm.graph.nodes}
        self.order: dict[str, int] = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.output = next(n for n in gm.graph.nodes if n.op == "output")

    def program(self, names: Iterable[str], keep: Iterable[str] = (), eager: bool = False) -> NodeProgram:
        """A program running ``names`` (any order given; run topologically) that returns the
        values of those among them in ``keep`` (the graph output as ``"output"``); ``eager``
        whatever the runner's mode (a program that communicates while it runs)."""
        nodes = tuple(sorted((self.nodes[n] for n in set(names)), key=lambda n: self.order[n.name]))
        keep = frozenset(keep) | {self.output.name}
        inside = set(nodes)
        inputs = tuple(dict.fromkeys(p for n in nodes for p in n.all_input_nodes if p not in inside))
        graph = fx.Graph()
        copied: dict[fx.Node, fx.Node] = {p: graph.placeholder(p.name) for p in inputs}
        returned: dict[str, Any] = {}
        for node in nodes:
            if node.op == "output":
                returned[node.name] = fx.map_arg(node.args[0], copied.__getitem__)
            else:
                copied[node] = graph.node_copy(node, copied.__getitem__)
                if node.name in keep:
                    returned[node.name] = copied[node]
        graph.output(returned)
        module = fx.GraphModule(self.gm, graph)
        call = module if eager or self.execution == "eager" else compile_callable(module, self.device)
        return NodeProgram(nodes, keep, inputs, module, call)

    def run(self, program: NodeProgram, env: dict[str, Any]) -> dict[str, Any]:
        """Run ``program`` on values in ``env`` (graph inputs and received values by name).

        Returns the kept values by node name (the graph output under ``"output"``). A graph
        input missing from ``env`` takes its default, as in a call of the traced model.
        """
        args = []
        for node in program.inputs:
            if node.name in env:
                args.append(env[node.name])
            elif node.op == "placeholder":
                args.append(node.args[0] if node.args else None)
            else:
                raise KeyError(f"program input {node.name!r} is missing from the environment")
        return program.call(*args)
