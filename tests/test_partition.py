import networkx as nx
import pytest
import torch

from hybridiff.compiler.check import chain_stages
from hybridiff.compiler.cost import NodeMeasure
from hybridiff.compiler.partition import best_partition, classify, dependency_graph
from hybridiff.graph.trace import LATENT_INPUT


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


def test_partition_is_the_best_contiguous_or_folded_split(traced):
    """The search's choice equals brute force over every valid 2-stage assignment."""
    replicated, heavy = classify(traced.graph)
    costs = {n.name: NodeMeasure(0.5, (1,), "float32", 4) for n in traced.graph.graph.nodes}
    for i, name in enumerate(heavy):
        tuple_output = name.startswith("unet_down_blocks")
        costs[name] = NodeMeasure(1.0 + (i * 7919 % 13), None if tuple_output else (1,), "float32", 0 if tuple_output else 1000)
    link = 1e4
    part = best_partition(traced.graph, costs, 2, link)

    g = dependency_graph(traced.graph)

    def step(stage: set[str], other: set[str]) -> float:
        needed = set().union(*(nx.ancestors(g, n) for n in stage)) & set(replicated)
        crossing = {u for u, v in g.edges if u in stage and v in other}
        if any(costs[u].shape is None for u in crossing):
            return float("inf")
        return sum(costs[n].cost_s for n in stage | needed) + sum(costs[u].bytes for u in crossing) / link

    def traffic(stage: set[str], other: set[str]) -> int:
        return sum(costs[u].bytes for u in {u for u, v in g.edges if u in stage and v in other})

    contiguous, folded = [], []
    for a in range(1, len(heavy)):
        first, second = set(heavy[:a]), set(heavy[a:])
        contiguous.append((max(step(first, second), step(second, first)), traffic(first, second)))
        for c in range(a + 1, len(heavy)):
            outer, middle = set(heavy[:a] + heavy[c:]), set(heavy[a:c])
            folded.append((max(step(outer, middle), step(middle, outer)), traffic(outer, middle) + traffic(middle, outer)))
    best = min(contiguous)
    better = [f for f in folded if f[0] < best[0] and f[1] <= best[1]]
    expected = min(better)[0] if better else best[0]
    broadcast = costs[heavy[-1]].bytes / link
    assert part.window_step_s == pytest.approx(expected + broadcast, rel=1e-9)
    assert part.row_bytes_per_window_step - costs[heavy[-1]].bytes <= best[1]
