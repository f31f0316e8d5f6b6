"""The plan against the pipeline it is run on: the traced graph's fingerprint, and every node
the plan names, checked before a step runs so a mismatch is one line, not a gloo abort."""

from __future__ import annotations

from typing import Any

from hybridiff.errors import HybridiffError
from hybridiff.graph.pipeline import TracedModel, example_call, trace_pipeline
from hybridiff.plan import Plan


def trace_for_plan(pipe: Any, plan: Plan) -> TracedModel:
    """``pipe``'s denoiser traced as the plan's compiler traced it, checked against the plan."""
    model = plan.model
    traced = trace_pipeline(
        pipe, plan.graph.refined, call=lambda: example_call(pipe, model.height, model.width, **model.pipeline_kwargs)
    )
    return check_fingerprint(traced, plan)


def check_fingerprint(traced: TracedModel, plan: Plan) -> TracedModel:
    """``traced`` if its graph is the plan's, else one line saying to recompile."""
    if traced.fingerprint != plan.graph.fingerprint:
        raise HybridiffError(
            f"plan fingerprint {plan.graph.fingerprint} does not match the model's graph ({traced.fingerprint}): "
            f"the plan was compiled for another model ({plan.model.source}) or the model changed since; compile a plan "
            "for this model (hybridiff compile)"
        )
    check_plan_graph(plan, traced.graph)
    return traced


def check_plan_graph(plan: Plan, graph: Any) -> None:
    """Every node the plan names exists in the traced graph (the fingerprint covers the
    graph's structure, not what an edited plan says about it)."""
    names = {n.name for n in graph.graph.nodes}
    for stage in plan.stages:
        missing = [n for n in [*stage.nodes, *stage.recompute] if n not in names]
        if missing:
            raise HybridiffError(
                f"stage {stage.index} of the plan names node {missing[0]!r}, which the model's graph does not have; "
                "the plan was edited or compiled for another model: recompile it"
            )
    tokens = plan.graph.tokens
    if tokens is not None and not {tokens.shard_after, tokens.gather_after} <= names:
        raise HybridiffError("the plan's token split names nodes the model's graph does not have; recompile the plan")
    unknown = [c.node for c in plan.cut_tensors if c.node not in names]
    if unknown:
        raise HybridiffError(f"the plan's cut tensor {unknown[0]!r} is not a node of the model's graph; recompile the plan")
