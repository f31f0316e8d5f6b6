"""Open big blocks until the stages balance: the policy on top of refine and partition."""

from __future__ import annotations

from typing import Callable

from torch import fx

from hybridiff.compiler.cost import NodeMeasure
from hybridiff.compiler.partition import Partition
from hybridiff.graph.refine import refinable, refine
from hybridiff.plan import imbalance

#: Refining stops once the slowest stage is within this factor of the mean stage.
BALANCE_TARGET = 1.05
MAX_REFINE_ROUNDS = 6


def balance(
    graph: fx.GraphModule, costed_split: Callable[[fx.GraphModule], tuple[dict[str, NodeMeasure], Partition]]
) -> tuple[fx.GraphModule, list[str], dict[str, NodeMeasure], Partition]:
    """Partition, opening big blocks while the stages are unbalanced.

    A block is opened when it costs more than a quarter of an ideal stage: then a cut can
    always be found within an eighth of a stage of the ideal place. Each round opens all such
    blocks (those torch.fx can trace) and re-costs the graph. The partition with the shortest
    window step wins.
    """
    refined: list[str] = []
    closed: set[str] = set()  # blocks whose forward does not trace
    measures, partition = costed_split(graph)
    best = (partition.window_step_s, graph, list(refined), measures, partition)
    for _ in range(MAX_REFINE_ROUNDS):
        if imbalance(partition.stage_costs) <= BALANCE_TARGET:
            break
        ideal = sum(partition.stage_costs) / len(partition.stage_costs)
        heavy = {name for stage in partition.stages for name in stage}
        openable = set(refinable(graph)) - closed
        targets = [
            node.target
            for node in graph.graph.nodes
            if node.name in heavy and node.target in openable and measures[node.name].cost_s > ideal / 4
        ]
        opened = []
        for target in targets:
            try:
                graph = refine(graph, target)
                opened.append(target)
            except Exception:  # noqa: BLE001 - an untraceable block simply stays whole
                closed.add(target)
        if not opened:
            break
        refined += opened
        measures, partition = costed_split(graph)
        if partition.window_step_s < best[0]:
            best = (partition.window_step_s, graph, list(refined), measures, partition)
    return best[1:]
