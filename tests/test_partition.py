import networkx as nx
import pytest
import torch

from hybridiff.compiler.compile import chain_stages
from hybridiff.compiler.cost import NodeMeasure
from hybridiff.compiler.partition import classify, dependency_graph, split_contiguous
from hybridiff.compiler.trace import LATENT_INPUT


def test_two_stage_chain_equals_model(traced, plan_traced, unet_call, plan):
    args, kwargs = unet_call
    inputs = traced.adapter.inputs_from_call(*args, **kwargs)
    with torch.inference_mode():
        expected = traced.pipe.unet(*args, **kwargs)[0]
        assert torch.equal(plan_traced.graph(**inputs), expected)
        got = chain_stages(plan_traced.graph, plan, inputs)
    assert torch.equal(got, expected)


def test_every_node_has_one_home_and_cuts_are_exact(plan_traced, plan):
    g = dependency_graph(plan_traced.graph)
    compute = {n.name for n in plan_traced.graph.graph.nodes if n.op != "placeholder"}
    owned = [n for s in plan.stages for n in s.nodes]
    assert len(owned) == len(set(owned))
    assert set(owned) | set(plan.graph.replicated) == compute
    stage_of = {n: s.index for s in plan.stages for n in s.nodes}
    crossing = {(u, stage_of[u]) for u, v in g.edges if u in stage_of and v in stage_of and stage_of[u] != stage_of[v]}
    assert {(c.node, c.producer) for c in plan.cut_tensors} == crossing
    assert all(c.bytes == 4 * torch.Size(c.shape).numel() for c in plan.cut_tensors if c.constant is None)
    # replicated nodes never depend on the latent, so recomputing them is always fresh
    assert not set(plan.graph.replicated) & nx.descendants(g, LATENT_INPUT)


def test_split_is_the_best_contiguous_split(traced):
    """The DP's choice equals brute force over every valid boundary, on made-up costs."""
    replicated, heavy = classify(traced.graph)
    costs = {n.name: NodeMeasure(0.5, (1,), "float32", 4) for n in traced.graph.graph.nodes}
    for i, name in enumerate(heavy):
        tuple_output = name.startswith("unet_down_blocks")
        costs[name] = NodeMeasure(1.0 + (i * 7919 % 13), None if tuple_output else (1,), "float32", 0 if tuple_output else 1000)
    link = 1e4
    part = split_contiguous(traced.graph, costs, 2, link)

    g = dependency_graph(traced.graph)

    def compute(nodes: set[str]) -> float:
        needed = set().union(*(nx.ancestors(g, n) for n in nodes)) & set(replicated)
        return sum(costs[n].cost_s for n in nodes | needed)

    candidates = []
    for cut in range(1, len(heavy)):
        first, second = set(heavy[:cut]), set(heavy[cut:])
        crossing = {u for u, v in g.edges if u in first and v in second}
        if any(costs[u].shape is None for u in crossing):
            continue
        sent = sum(costs[u].bytes for u in crossing) / link
        candidates.append(max(compute(first) + sent, compute(second)))
    broadcast = costs[heavy[-1]].bytes / link
    assert part.window_step_s == pytest.approx(min(candidates) + broadcast, rel=1e-12)
