"""Open coarse blocks: replace a block's node by the graph of its own forward.

A UNet's up block can hold 40% of the compute; no cut at block granularity balances 4 or 8
stages around it. Refining inlines the block's forward, traced with the block's children
(resnets, attention transformers, samplers) as leaves, so the partitioner can cut inside it.
The refined graph computes exactly what the block computed.

A plan records which nodes were refined (by module path, in order); the runtime applies the
same list after tracing, which reproduces the compiler's graph and fingerprint.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Iterable

import torch.utils._pytree as pytree
from torch import fx, nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.trace import BlockTracer, default_leaves


class _BlockCall(nn.Module):
    """Calls ``block`` as the graph did, with the call's tensor arguments as flat inputs."""

    def __init__(self, block: nn.Module, template: list[Any], slots: list[int], spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.m = block
        self._template, self._slots, self._spec = template, slots, spec

    def call(self, *flat: Any) -> Any:
        values = list(self._template)
        for slot, value in zip(self._slots, flat):
            values[slot] = value
        args, kwargs = pytree.tree_unflatten(values, self._spec)
        return self.m(*args, **kwargs)


def _positional_forward(arity: int) -> Any:
    """A ``forward(self, i0, ..., iN)``: torch.fx cannot trace through ``*args``."""
    names = ", ".join(f"i{k}" for k in range(arity))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.call({names})\n", namespace)  # noqa: S102
    return namespace["forward"]


def refinable(gm: fx.GraphModule) -> list[str]:
    """Module paths of call_module nodes whose block has children to open."""
    return [
        n.target for n in gm.graph.nodes if n.op == "call_module" and next(gm.get_submodule(n.target).children(), None)
    ]


def refine(gm: fx.GraphModule, target: str) -> fx.GraphModule:
    """A new graph module with the call of ``target`` replaced by its block's forward."""
    graph = copy.deepcopy(gm.graph)  # ``gm`` stays as it was
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == target)
    block = gm.get_submodule(target)
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]
    wrapper_cls = type("_BlockCallN", (_BlockCall,), {"forward": _positional_forward(len(slots))})
    sub = BlockTracer(default_leaves(block)).trace(wrapper_cls(block, leaves, slots, spec))
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    before = set(graph.nodes)
    with graph.inserting_before(node):
        result = graph.graph_copy(sub, dict(zip(placeholders, [leaves[i] for i in slots])), return_output_node=False)
    for new in graph.nodes:  # in order, so renamed nodes number predictably
        if new not in before and new.op in ("call_module", "get_attr"):
            new.target = f"{target}.{new.target.removeprefix('m.')}"
            new._rename(new.target.replace(".", "_"))
    _replace_uses(node, result)
    graph.erase_node(node)
    refined = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    refined.meta.update(gm.meta)  # what the adapter declared (the token layout) holds for the refinement too
    refined.graph.eliminate_dead_code()
    refined.graph.lint()
    refined.recompile()
    return refined


def _replace_uses(node: fx.Node, value: Any) -> None:
    """Point every use of ``node`` at ``value`` (a node or a nested tuple of nodes)."""
    if isinstance(value, fx.Node):
        node.replace_all_uses_with(value)
        return
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
            _replace_uses(user, value[user.args[1]])
            user.graph.erase_node(user)
        else:
            user.args = pytree.tree_map(lambda a: value if a is node else a, user.args)
            user.kwargs = pytree.tree_map(lambda a: value if a is node else a, user.kwargs)


def apply_refinements(graph: fx.GraphModule, refined: Iterable[str]) -> fx.GraphModule:
    """Re-open the blocks a plan lists, reproducing the compiler's graph."""
    for target in refined:
        if target not in refinable(graph):
            raise HybridiffError(
                f"the plan opens block {target!r}, which this model's graph does not have as a block; "
                "the plan was edited or compiled for another model: recompile it"
            )
        graph = refine(graph, target)
    return graph
