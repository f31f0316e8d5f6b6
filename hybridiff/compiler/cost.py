"""Measure what each graph node costs on this device, and what its output weighs.

Block cost is not proportional to parameter count (full-resolution attention dominates a
UNet), so the partitioner balances on measured time. Each node is timed on its own, replaying
its real inputs from one full forward, and the median of ``repeats`` runs is kept.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from hybridiff.execution import GraphRunner


@dataclass(frozen=True)
class NodeMeasure:
    cost_s: float
    #: Shape, dtype and size of the node's output when it is a tensor (None and 0 otherwise).
    shape: tuple[int, ...] | None
    dtype: str | None
    bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_nodes(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, NodeMeasure]:
    """Per-node median cost and output size for one forward on ``inputs``."""
    runner = GraphRunner(gm)
    device = inputs["sample"].device
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    with torch.inference_mode():
        everything = runner.program([n.name for n in compute], keep=[n.name for n in compute])
        values = runner.run(everything, inputs)
        env = {runner.nodes[k]: v for k, v in inputs.items()}
        env.update({runner.nodes[k]: v for k, v in values.items()})
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        interp.env = env
        measures = {}
        for node in compute:
            cost = median_time(lambda: interp.run_node(node), repeats, device)
            out = env[node]
            if isinstance(out, torch.Tensor):
                measures[node.name] = NodeMeasure(
                    cost, tuple(out.shape), str(out.dtype).removeprefix("torch."), out.numel() * out.element_size()
                )
            else:
                measures[node.name] = NodeMeasure(cost, None, None, 0)
    return measures


def forward_time(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """Median time of a whole forward of the traced graph."""
    with torch.inference_mode():
        return median_time(lambda: gm(**inputs), repeats, inputs["sample"].device)
