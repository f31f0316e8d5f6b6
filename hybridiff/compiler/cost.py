"""Measure what each graph node costs on this device, and what its output weighs.

Block cost is not proportional to parameter count (full-resolution attention dominates a
UNet), so the partitioner balances on measured time. Each node is timed on its own, replaying
its real inputs from one full forward, and the median of ``repeats`` runs is kept.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

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


def profile_nodes(
    gm: fx.GraphModule, inputs: dict[str, Any], repeats: int, method: str = "time"
) -> dict[str, NodeMeasure]:
    """Per-node cost and output size for one forward on ``inputs``.

    ``method="time"`` measures each node (median of ``repeats``); ``method="flops"`` counts its
    floating-point operations with torch's flop counter and converts them to seconds with one
    measured whole forward, which makes the costs, and so the partition, reproducible across
    runs and machines (at the price of ignoring memory-bound work such as norms).
    """
    if method not in ("time", "flops"):
        raise ValueError(f"unknown cost method {method!r}")
    runner = GraphRunner(gm)
    device = device_of(inputs)
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
            if method == "time":
                cost = median_time(lambda: interp.run_node(node), repeats, device)
            else:
                with FlopCounterMode(display=False) as counter:
                    interp.run_node(node)
                cost = float(counter.get_total_flops())
            out = env[node]
            if isinstance(out, torch.Tensor):
                measures[node.name] = NodeMeasure(
                    cost, tuple(out.shape), str(out.dtype).removeprefix("torch."), out.numel() * out.element_size()
                )
            else:
                measures[node.name] = NodeMeasure(cost, None, None, 0)
    if method == "flops":
        seconds_per_flop = forward_time(gm, inputs, repeats) / max(1.0, sum(m.cost_s for m in measures.values()))
        measures = {k: replace(m, cost_s=m.cost_s * seconds_per_flop) for k, m in measures.items()}
    return measures


def forward_time(gm: fx.GraphModule, inputs: dict[str, Any], repeats: int) -> float:
    """Median time of a whole forward of the traced graph."""
    runner = GraphRunner(gm)
    program = runner.program([n.name for n in gm.graph.nodes if n.op != "placeholder"])
    with torch.inference_mode():
        return median_time(lambda: runner.run(program, inputs), repeats, device_of(inputs))


def device_of(inputs: dict[str, Any]) -> torch.device:
    return next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
