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
import torch.utils._pytree as pytree
from torch import fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hybridiff.graph.execution import GraphRunner
from hybridiff.plan import Execution


@dataclass(frozen=True)
class NodeMeasure:
    cost_s: float
    #: Shape, dtype and size of the node's output when it is a tensor (None and 0 otherwise).
    shape: tuple[int, ...] | None
    dtype: str | None
    bytes: int
    #: The output itself when it is a plain number or a shape: static for a plan's input
    #: shapes, so a stage that needs it reads it from the plan instead of the wire.
    constant: int | float | tuple[int, ...] | None = None


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


@dataclass(frozen=True)
class DeviceModel:
    """Effective throughput of a device, for costing graphs that cannot run here (meta tensors).

    A node costs ``max(flops / tflops, bytes moved / memory bandwidth)``: compute-bound blocks
    by their FLOPs, memory-bound ones (norms, elementwise, small batch) by their traffic.
    """

    name: str = "A100-class fp16 (effective)"
    tflops: float = 150.0
    mem_gbps: float = 1500.0


def _flop_counter() -> FlopCounterMode:
    """Torch's flop counter, also counting CPU flash attention (missing from its registry)."""
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {} if cpu_flash is None else {cpu_flash: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _as_constant(value: Any) -> int | float | tuple[int, ...] | None:
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (tuple, torch.Size)) and all(type(v) is int for v in value):
        return tuple(value)
    return None


def _bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def profile_nodes(
    gm: fx.GraphModule,
    inputs: dict[str, Any],
    repeats: int,
    method: str = "time",
    device_model: DeviceModel | None = None,
    seconds_per_flop: float | None = None,
) -> dict[str, NodeMeasure]:
    """Per-node cost and output size for one forward on ``inputs``.

    - ``time``: each node measured on this device, median of ``repeats``.
    - ``flops``: FLOPs counted with torch's flop counter and converted to seconds with one
      measured whole forward; reproducible across runs and machines, but blind to memory-bound
      work such as norms. ``seconds_per_flop`` given, no forward is run (meta ``inputs``).
    - ``roofline``: FLOPs and bytes moved priced by ``device_model``; needs no real data, so it
      costs real-size models built on the meta device.
    """
    if method not in ("time", "flops", "roofline"):
        raise ValueError(f"unknown cost method {method!r}")
    device_model = device_model or DeviceModel()
    runner = GraphRunner(gm)
    device = device_of(inputs)
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    with torch.inference_mode():
        everything = runner.program([n.name for n in compute], keep=[n.name for n in compute])
        values = runner.run(everything, inputs)
        env = {runner.nodes[k]: v for k, v in inputs.items()}
        # a parameter read by the graph (Sana's scale_shift_table) reaches blocks detached: the
        # flop counter's module tracker cannot hook a leaf that requires grad in inference mode
        env.update({runner.nodes[k]: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()})
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        interp.env = env
        measures = {}
        for node in compute:
            out = env[node]
            if method == "time":
                cost = median_time(lambda n=node: interp.run_node(n), repeats, device)
            else:
                with _flop_counter() as counter:
                    interp.run_node(node)
                cost = float(counter.get_total_flops())
                if method == "roofline":
                    moved = _bytes(out) + sum(_bytes(env[p]) for p in node.all_input_nodes)
                    if node.op == "call_module":
                        moved += _bytes(list(gm.get_submodule(node.target).parameters()))
                    cost = max(cost / (device_model.tflops * 1e12), moved / (device_model.mem_gbps * 1e9))
            if isinstance(out, torch.Tensor):
                measures[node.name] = NodeMeasure(
                    cost, tuple(out.shape), str(out.dtype).removeprefix("torch."), out.numel() * out.element_size()
                )
            else:
                measures[node.name] = NodeMeasure(cost, None, None, 0, _as_constant(out))
    if method == "flops":
        if seconds_per_flop is None:
            seconds_per_flop = forward_time(gm, inputs, repeats) / max(1.0, sum(m.cost_s for m in measures.values()))
        measures = {k: replace(m, cost_s=m.cost_s * seconds_per_flop) for k, m in measures.items()}
    return measures


def forward_time(gm: fx.GraphModule, inputs: dict[str, Any], repeats: int, execution: Execution = "eager") -> float:
    """Median time of a whole forward of the traced graph."""
    return forward_times(gm, {0: inputs}, repeats, execution)[0]


def forward_times(
    gm: fx.GraphModule, inputs: dict[int, dict[str, Any]], repeats: int, execution: Execution = "eager"
) -> dict[int, float]:
    """Median time of a whole forward on each of several inputs (by key), timed in turns, so
    that a machine whose speed drifts affects them alike and their ratios hold. Compiled, each
    input's first forward (untimed) compiles the graph for its shapes."""
    device = device_of(next(iter(inputs.values())))
    runner = GraphRunner(gm, execution, device)
    program = runner.program([n.name for n in gm.graph.nodes if n.op != "placeholder"])
    times: dict[int, list[float]] = {key: [] for key in inputs}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, values in inputs.items():
                times[key].append(median_time(lambda v=values: runner.run(program, v), 1, device, warmup=0 if times[key] else 1))
    return {key: statistics.median(t) for key, t in times.items()}


def device_of(inputs: dict[str, Any]) -> torch.device:
    return next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
