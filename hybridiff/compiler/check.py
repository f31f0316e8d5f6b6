"""Check a plan against its model by chaining its stages in one process."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.refine import apply_refinements
from hybridiff.graph.trace import Leaf, graph_fingerprint, trace_module
from hybridiff.plan import Plan


def check_plan(
    plan: Plan, model: nn.Module, example_inputs: tuple | dict[str, Any], leaves: Iterable[Leaf] | None = None
) -> float:
    """Chain the plan's stages in one process and return the max abs difference to ``model``.

    Raises if the model's graph is not the one the plan was compiled from.
    """
    traced = trace_module(model, example_inputs, leaves)
    graph = apply_refinements(traced.graph, plan.graph.refined)
    fingerprint = graph_fingerprint(graph)
    if fingerprint != plan.graph.fingerprint:
        raise HybridiffError(
            f"plan fingerprint {plan.graph.fingerprint} does not match the model's graph ({fingerprint}); recompile"
        )
    args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
    with torch.inference_mode():
        expected = _first_tensor(model(*args, **kwargs))
        got = _first_tensor(chain_stages(graph, plan, traced.inputs))
    return float((got.float() - expected.float()).abs().max())


def _first_tensor(value: Any) -> torch.Tensor:
    if hasattr(value, "to_tuple"):  # diffusers/transformers output dataclasses
        value = value.to_tuple()
    return next(v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor))


def chain_stages(gm: fx.GraphModule, plan: Plan, inputs: dict[str, Any]) -> Any:
    """Run the plan's stages in one process with fresh (not stale) values.

    Stages run segment by segment in topological order (a folded stage has two segments).
    Each stage sees only the inputs, its own values, the plan's constants and the cut tensors
    other stages declared: equal to the model's forward exactly when the partition is correct.
    """
    runner = GraphRunner(gm)
    constants = {c.node: c.runtime_value() for c in plan.cut_tensors if c.constant is not None}
    envs = {s.index: {**inputs, **constants} for s in plan.stages}
    consumers = {c.node: c.consumers for c in plan.cut_tensors if c.constant is None}
    stage_of = {n: s.index for s in plan.stages for n in s.nodes}
    order = [n.name for n in gm.graph.nodes if n.name in stage_of]
    segments = [(stage_of[order[0]], [order[0]])]
    for name in order[1:]:
        if stage_of[name] == segments[-1][0]:
            segments[-1][1].append(name)
        else:
            segments.append((stage_of[name], [name]))
    recomputed: set[int] = set()
    out = None
    for index, names in segments:
        stage = plan.stages[index]
        todo = names if index in recomputed else stage.recompute + names
        recomputed.add(index)
        values = runner.run(runner.program(todo, keep=todo), envs[index])
        envs[index].update(values)
        for name, value in values.items():
            for consumer in consumers.get(name, ()):
                envs[consumer][name] = value
        out = values.get("output", out)
    return out
